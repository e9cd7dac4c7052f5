"""The etcd store against real etcd members on loopback, with agents driving real nginx instances."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from grayagent.errors import Conflict
from grayagent.runtime.agent import Agent
from grayagent.stores.base import digest_of
from grayagent.stores.etcd import EtcdStore
from tests.agenthelp import Client, grayagent, running_agent, wait_live
from tests.docs import document, dump, service
from tests.servers.backends import Backend
from tests.servers.etcd import EtcdCluster
from tests.servers.nginx import NginxInstance
from tests.servers.proc import free_port, wait_until

PREFIX = "/grayagent/shop"


def url(cluster: EtcdCluster, members: list[int] | None = None, query: str = "") -> str:
    eps = [cluster.endpoints[i] for i in (members if members is not None else range(cluster.size))]
    return f"etcd://{','.join(eps)}{PREFIX}{'?' + query if query else ''}"


def doc_for(backends: dict[str, Backend], port: int, canary: float) -> bytes:
    servers = {n: [f"127.0.0.1:{b.port}"] for n, b in backends.items()}
    return dump(document(service(listen=f"127.0.0.1:{port}", servers=servers,
                                 split={"key": {"header": "X-User-Id"},
                                        "weights": {"stable": 100 - canary, "canary": canary, "beta": 0}})))


def publish(store: EtcdStore, content: bytes, message: str = "") -> int:
    current = store.current()
    return store.publish(content, current.version if current else 0, "test", message).version


def applied_versions(state: Path) -> list[int]:
    """Versions applied because the store moved (a repair of a proxy that lost its config is not one)."""
    entries = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    return [e["version"] for e in entries
            if e["event"] == "apply" and e["result"] == "ok" and e.get("source") != "drift"]


@pytest.fixture
def etcd1(tmp_path: Path) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path / "etcd", size=1) as cluster:
        yield cluster


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path / "etcd", size=3) as cluster:
        yield cluster


@contextmanager
def fleet(n: int, store_url: str, root: Path, **settings: float) -> Iterator[list[tuple[Agent, NginxInstance, Path]]]:
    """n agents, each with its own nginx, state dir and etcd connection."""
    with ExitStack() as stack:
        out = []
        for i in range(n):
            nginx = NginxInstance(root / f"nginx{i}").start()
            stack.callback(nginx.stop)
            store = EtcdStore(store_url)
            stack.callback(store.close)
            state = root / f"state{i}"
            agent = stack.enter_context(running_agent(store, nginx, state, reuseport=True, resync_interval=300,
                                                      host=f"gw{i}", **settings))
            out.append((agent, nginx, state))
        yield out


def test_cli_publish_history_show_diff_revert_and_conflict(tmp_path: Path, etcd1: EtcdCluster) -> None:
    store_url = url(etcd1)
    first, second = tmp_path / "v1.json", tmp_path / "v2.json"
    first.write_bytes(dump(document(service(split={"weights": {"stable": 90, "canary": 10}}))))
    second.write_bytes(dump(document(service(split={"weights": {"stable": 50, "canary": 50}}))))
    assert grayagent("publish", str(first), "--store", store_url, "-m", "ten").stdout.strip() == "1"
    assert grayagent("publish", str(second), "--store", store_url, "--expect-version", "1").stdout.strip() == "2"
    stale = grayagent("publish", str(second), "--store", store_url, "--expect-version", "1")
    assert stale.returncode == 3
    assert stale.stderr.strip() == ("grayagent: conflict: expected current version 1, but the store is at 2; "
                                    "re-read and publish again")
    history = json.loads(grayagent("history", "--store", store_url, "-o", "json").stdout)
    assert [(h["version"], h["parent"], h["message"]) for h in history] == [(1, 0, "ten"), (2, 1, "")]
    assert "+      \"stable\": 50," in grayagent("diff", "1", "2", "--store", store_url).stdout
    assert grayagent("revert", "1", "--store", store_url).stdout.strip() == "3"
    assert grayagent("show", "--store", store_url).stdout == first.read_text()
    # the layout is plain keys that other tools can read
    assert etcd1.get(f"{PREFIX}/current") == "3"
    assert json.loads(etcd1.get(f"{PREFIX}/versions/3"))["parent"] == 2
    # The chain: intact, until another tool rewrites version 2 with a recomputed digest (issue 12.10).
    assert grayagent("history", "--verify", "--store", store_url).returncode == 0
    forged = json.loads(etcd1.get(f"{PREFIX}/versions/2"))
    forged["content"] = first.read_text()
    forged["digest"] = digest_of(forged["content"].encode())
    etcd1.put(f"{PREFIX}/versions/2", json.dumps(forged))
    broken = grayagent("history", "--verify", "--store", store_url)
    assert broken.returncode == 1 and broken.stdout.startswith("version 3: parent_digest does not match version 2")
    assert grayagent("revert", "2", "--store", store_url).returncode == 1
    assert etcd1.get(f"{PREFIX}/current") == "3"


def test_concurrent_publishers_exactly_one_wins_per_parent(etcd1: EtcdCluster) -> None:
    stores = [EtcdStore(url(etcd1)) for _ in range(6)]
    try:
        for parent in range(4):
            results: list[object] = []
            barrier = threading.Barrier(len(stores))

            def race(store: EtcdStore, i: int, expected: int = parent, start: threading.Barrier = barrier,
                     out: list[object] = results) -> None:
                start.wait()
                try:
                    out.append(store.publish(dump(document(name="shop")), expected, f"racer{i}", "").version)
                except Conflict as exc:
                    out.append(exc)

            threads = [threading.Thread(target=race, args=(s, i)) for i, s in enumerate(stores)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            wins = [r for r in results if isinstance(r, int)]
            assert wins == [parent + 1], results
            assert all(isinstance(r, Conflict) and r.actual == parent + 1 for r in results if r not in wins)
        assert [m.version for m in stores[0].history()] == [1, 2, 3, 4]
    finally:
        for s in stores:
            s.close()


def test_documents_written_by_etcdctl_are_applied_or_refused(tmp_path: Path, etcd1: EtcdCluster, nginx,
                                                             backends) -> None:
    port = free_port()
    store = EtcdStore(url(etcd1))
    publish(store, doc_for(backends, port, 0))
    with running_agent(store, nginx, tmp_path / "state", min_apply_interval=0.05) as agent:
        wait_live(nginx, 1)
        # Another tool writes a bare YAML document and moves the pointer, with etcdctl.
        yaml_doc = (f"apiVersion: grayagent/v1\nkind: GrayRelease\nmetadata: {{name: shop}}\nspec:\n  services:\n"
                    f"  - name: product\n    listen: '127.0.0.1:{port}'\n    upstreams:\n"
                    f"      canary: {{servers: ['127.0.0.1:{backends['canary'].port}']}}\n    default: canary\n")
        etcd1.put(f"{PREFIX}/versions/2", yaml_doc)
        etcd1.put(f"{PREFIX}/current", "2")
        wait_live(nginx, 2)
        assert Client(port).get("/", {"X-User-Id": "u"})[1] == "canary"
        etcd1.put(f"{PREFIX}/versions/3", "apiVersion: grayagent/v1\nkind: GrayRelease\nspec: {}\n")
        etcd1.put(f"{PREFIX}/current", "3")
        wait_until(lambda: agent.status.last_error is not None, 10, "version 3 to be refused")
        assert "metadata" in agent.status.last_error
        assert Client(port).get("/", {"X-User-Id": "u"})[1] == "canary"
    refusals = [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines() if '"refuse"' in x]
    assert [r["version"] for r in refusals] == [3]
    store.close()


def test_leader_killed_during_publishes_every_agent_applies_each_version_once(tmp_path: Path, etcd3: EtcdCluster,
                                                                               backends) -> None:
    port = free_port()
    publisher = EtcdStore(url(etcd3))
    with fleet(3, url(etcd3), tmp_path, min_apply_interval=0.02) as agents:
        killed = None
        for n in range(1, 13):
            if n == 5:
                killed = etcd3.leader_index()
                etcd3.kill_member(killed)
            if n == 9 and killed is not None:
                etcd3.start_member(killed)
            assert publish(publisher, doc_for(backends, port, n), f"v{n}") == n

            def all_applied(version: int = n) -> bool:
                return all(a.status.applied_version == version for a, _, _ in agents)
            wait_until(all_applied, 20, f"every agent to apply version {n}")
        for _, nginx, _ in agents:
            wait_live(nginx, 12)
        states = [state for _, _, state in agents]
    # Read the audit logs once the agents have stopped: an agent records a version as applied a moment
    # before its audit entry is written.
    for state in states:
        assert applied_versions(state) == list(range(1, 13))
    publisher.close()


def test_full_etcd_restart_while_agents_run(tmp_path: Path, etcd1: EtcdCluster, nginx, backends) -> None:
    port = free_port()
    store = EtcdStore(url(etcd1, query="timeout=1"))
    publish(store, doc_for(backends, port, 0))
    with running_agent(store, nginx, tmp_path / "state", min_apply_interval=0.05, resync_interval=300) as agent:
        wait_live(nginx, 1)
        etcd1.stop()
        wait_until(lambda: not agent.status.store_reachable, 15, "the agent to notice the store is gone")
        assert Client(port).get("/", {"X-User-Id": "u"})[1] == "stable"  # still serving last-good
        etcd1.start()
        wait_until(lambda: agent.status.store_reachable, 30, "the agent to reconnect")
        publish(store, doc_for(backends, port, 100))
        wait_live(nginx, 2)
    assert applied_versions(tmp_path / "state") == [1, 2]
    store.close()


def test_compaction_past_the_agents_revision(tmp_path: Path, etcd3: EtcdCluster, nginx, backends) -> None:
    port = free_port()
    publisher = EtcdStore(url(etcd3, members=[1, 2]))
    publish(publisher, doc_for(backends, port, 0))
    # The agent talks to member 0 only, so stopping it cuts the agent off while the others move on.
    agent_store = EtcdStore(url(etcd3, members=[0], query="timeout=1"))
    with running_agent(agent_store, nginx, tmp_path / "state", min_apply_interval=0.05, resync_interval=300) as agent:
        wait_live(nginx, 1)
        etcd3.stop_member(0)
        for n in (20, 40, 60):
            publish(publisher, doc_for(backends, port, n))
        revision = etcd3.current_revision()
        etcd3.compact(revision)
        etcd3.start_member(0)
        wait_live(nginx, 4, timeout=30)
        # nginx serves 4 while the agent is still verifying; its own record follows a moment later.
        wait_until(lambda: agent.status.applied_version == 4 and agent.status.healthy, 10, "the agent to record 4")
    # Versions 2 and 3 were compacted away while the agent was cut off: it re-lists and applies only 4.
    audit = (tmp_path / "state" / "audit.jsonl").read_text()
    assert applied_versions(tmp_path / "state") == [1, 4], audit
    agent_store.close()
    publisher.close()


def test_tls_and_auth_with_expiring_tokens(tmp_path: Path, nginx, backends) -> None:
    with EtcdCluster(tmp_path / "etcd", size=1, tls=True, auth=True, auth_token_ttl=2) as cluster:
        secret = tmp_path / "etcd-password"
        secret.write_text(cluster.password + "\n")
        query = (f"ca={cluster.ca_cert}&cert={cluster.client_cert}&key={cluster.client_key}"
                 f"&user={cluster.user}&password_file={secret}")
        store_url = f"etcds://{cluster.endpoints[0]}{PREFIX}?{query}"
        port = free_port()
        doc = tmp_path / "doc.json"
        doc.write_bytes(doc_for(backends, port, 0))
        assert grayagent("publish", str(doc), "--store", store_url).returncode == 0
        store = EtcdStore(store_url)
        with running_agent(store, nginx, tmp_path / "state", min_apply_interval=0.05):
            wait_live(nginx, 1)
            time.sleep(3)  # longer than --auth-token-ttl: the agent's token has expired
            doc.write_bytes(doc_for(backends, port, 100))
            assert grayagent("publish", str(doc), "--store", store_url).returncode == 0
            wait_live(nginx, 2)
        store.close()
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-password")
        denied = grayagent("history", "--store", store_url.replace(str(secret), str(wrong)))
        assert denied.returncode == 1 and len(denied.stderr.strip().splitlines()) == 1
        assert "authentication failed" in denied.stderr and "not-the-password" not in denied.stderr
        inline = grayagent("history", "--store", f"etcds://{cluster.user}:hunter2@{cluster.endpoints[0]}{PREFIX}")
        assert inline.returncode == 2 and "hunter2" not in inline.stderr
        no_tls = grayagent("history", "--store", f"etcd://{cluster.endpoints[0]}{PREFIX}?timeout=1")
        assert no_tls.returncode == 1


def test_fleet_status_and_wait(tmp_path: Path, etcd1: EtcdCluster, backends) -> None:
    port = free_port()
    store_url = url(etcd1)
    publisher = EtcdStore(store_url)
    publish(publisher, doc_for(backends, port, 0))
    with fleet(2, store_url, tmp_path, min_apply_interval=0.05):
        done = grayagent("status", "--store", store_url, "--wait", "20", "--min-agents", "2", "-o", "json")
        assert done.returncode == 0, done.stdout
        report = json.loads(done.stdout)
        assert report["converged"] and report["current_version"] == 1
        assert sorted(a["host"] for a in report["agents"]) == ["gw0", "gw1"]
        publish(publisher, doc_for(backends, port, 50))
        assert grayagent("status", "--store", store_url, "--wait", "20", "--min-agents", "2").returncode == 0
        # Expecting more gateways than report is not convergence.
        assert grayagent("status", "--store", store_url, "--wait", "1", "--min-agents", "3").returncode == 1
    # Agents that stopped revoke their lease: their entries go at once, and an empty fleet has not converged.
    wait_until(lambda: not publisher.fleet(), 10, "the stopped agents' entries to vanish")
    gone = grayagent("status", "--store", store_url, "--wait", "0")
    assert gone.returncode == 1 and "0 agents" in gone.stdout
    publisher.close()
