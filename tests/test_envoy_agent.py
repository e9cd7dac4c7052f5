"""End to end with a real Envoy (started from the shipped bootstrap), a real directory store and the agent:
publish, serve the split, change rules without touching the listener, refuse what Envoy would reject,
survive a rejection that only Envoy can see, change topology, revert through the CLI agent."""

from __future__ import annotations

import http.client
import json
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from grayagent.rules.model import parse_document
from grayagent.rules.routing import Request, route
from grayagent.stores.base import digest_of
from grayagent.stores.file import FileStore
from tests.agenthelp import Client, grayagent, running_agent_for
from tests.docs import document, dump, service
from tests.envoyhelp import envoy_instance, envoy_target, wait_target_live
from tests.servers.envoy import EnvoyInstance, envoy_binary
from tests.servers.proc import free_port, wait_until


@pytest.fixture
def envoy(tmp_path: Path) -> Iterator[EnvoyInstance]:
    yield from envoy_instance(tmp_path)


LISTENER_STATS = ("listener_added", "listener_modified", "listener_removed", "listener_create_success",
                  "listener_in_place_updated", "total_listeners_draining", "lds.update_attempt")


def make_doc(backends, port: int, weights: dict[str, float], **extra) -> dict:
    servers = {name: [f"127.0.0.1:{b.port}"] for name, b in backends.items()}
    return document(service(listen=f"127.0.0.1:{port}", servers=servers,
                            split={"key": {"header": "X-User-Id"}, "weights": weights}, **extra))


def publish(store: FileStore, doc: dict, message: str = "") -> int:
    current = store.current()
    return store.publish(dump(doc), current.version if current else 0, "test", message).version


def audit(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]


def files_of(envoy) -> dict[str, bytes]:
    return {str(p.relative_to(envoy.envoy_dir)): p.read_bytes() for p in envoy.envoy_dir.rglob("*.json")}


def test_publish_serves_split_and_rules_end_to_end(tmp_path: Path, envoy, backends) -> None:
    port = free_port()
    store = FileStore(str(tmp_path / "store"))
    doc = make_doc(backends, port, {"stable": 70, "canary": 20, "beta": 10},
                   rules=[{"name": "vip", "match": {"headers": {"X-User-Tag": {"in": ["vip"]}}}, "to": "beta"}])
    svc = parse_document(dump(doc), "doc").services[0]
    publish(store, doc)
    target = envoy_target(envoy)
    with running_agent_for(store, target, tmp_path / "state"):
        wait_target_live(target, 1)
        client = Client(port)
        counts: dict[str, int] = {}
        for _ in range(2000):
            uid = f"user-{random.getrandbits(40)}"
            status, body = client.get("/", {"X-User-Id": uid})
            assert status == 200
            assert body == route(svc, Request.build(headers={"X-User-Id": uid})).upstream, uid
            counts[body] = counts.get(body, 0) + 1
        assert client.get("/", {"X-User-Tag": "vip", "X-User-Id": "1"})[1] == "beta"
        # Clients cannot pick their upstream through the internal headers.
        forged = {"X-User-Id": "1", "X-Grayagent-Split": "beta", "x-grayagent-in-1": "vip"}
        assert client.get("/", forged)[1] == route(svc, Request.build(headers={"X-User-Id": "1"})).upstream
        shares = {k: v / 2000 for k, v in counts.items()}
        assert abs(shares["stable"] - 0.7) < 0.05 and abs(shares["canary"] - 0.2) < 0.05, shares
        # The internal headers never reach the backend.
        seen = [h for _, _, headers in backends["beta"].requests for h, _ in headers]
        assert seen and not any(h.lower().startswith(("x-grayagent-", "x-envoy-")) for h in seen), seen
    applied = [e for e in audit(tmp_path / "state") if e["event"] == "apply"]
    assert applied[0]["result"] == "ok" and {"render", "validate", "swap", "verify"} <= set(applied[0]["steps_ms"])
    for path in envoy.envoy_dir.rglob("*.json"):
        assert oct(path.stat().st_mode & 0o777) == "0o640", path


def test_rule_change_is_routes_only_and_never_touches_the_listener(tmp_path: Path, envoy, backends) -> None:
    port = free_port()
    store = FileStore(str(tmp_path / "store"))
    publish(store, make_doc(backends, port, {"stable": 100, "canary": 0, "beta": 0}))
    target = envoy_target(envoy)
    with running_agent_for(store, target, tmp_path / "state", min_apply_interval=0.05):
        wait_target_live(target, 1)
        client = Client(port)  # one keep-alive connection across every change
        assert client.get("/", {"X-User-Id": "u1"})[1] == "stable"
        before = {k: envoy.stat(f"listener_manager.{k}") for k in LISTENER_STATS}
        for n, (to, weights) in enumerate([("canary", {"stable": 0, "canary": 100, "beta": 0}),
                                           ("beta", {"stable": 0, "canary": 0, "beta": 100}),
                                           ("stable", {"stable": 100, "canary": 0, "beta": 0})], start=2):
            rules = [{"name": f"r{n}", "match": {"headers": {"X-Round": {"exact": str(n)}}}, "to": "beta"}]
            publish(store, make_doc(backends, port, weights, rules=rules))
            wait_target_live(target, n)
            assert client.get("/", {"X-User-Id": "u1"})[1] == to
            assert client.get("/", {"X-User-Id": "u1", "X-Round": str(n)})[1] == "beta"
        after = {k: envoy.stat(f"listener_manager.{k}") for k in LISTENER_STATS}
        assert after == before, "a rule change must not add, modify, replace or drain a listener"
        assert envoy.stat("listener_manager.lds.update_rejected") == 0
        assert envoy.stat(f"http.{listener(port)}.rds.{listener(port)}.update_success") >= 4


def get_with_host(port: int, host: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("GET", "/", skip_host=True)
    conn.putheader("Host", host)
    conn.endheaders()
    response = conn.getresponse()
    try:
        return response.status, response.read().decode()
    finally:
        conn.close()


def listener(port: int) -> str:
    return f"grayagent_ip4_127_0_0_1_{port}"


def test_candidate_envoy_refuses_in_validation_keeps_last_good(tmp_path: Path, envoy, backends) -> None:
    port = free_port()
    store = FileStore(str(tmp_path / "store"))
    publish(store, make_doc(backends, port, {"stable": 100, "canary": 0, "beta": 0}))
    target = envoy_target(envoy)
    state = tmp_path / "state"
    with running_agent_for(store, target, state, min_apply_interval=0.1, retry_initial=60) as agent:
        wait_target_live(target, 1)
        good = files_of(envoy)
        # Valid for grayagent (and nginx), but its RE2 program is too big for Envoy.
        huge = [{"name": "many", "match": {"headers": {"X-A": {"in": [f"{i:04d}" + "v" * 200 for i in range(1000)]}}},
                 "to": "canary"}]
        publish(store, make_doc(backends, port, {"stable": 0, "canary": 100, "beta": 0}, rules=huge))
        wait_until(lambda: agent.status.last_error is not None, 20, "the apply of version 2 to fail")
        assert "envoy --mode validate failed" in agent.status.last_error, agent.status.last_error
        assert files_of(envoy) == good
        assert target.live_version()[0] == 1
        assert Client(port).get("/", {"X-User-Id": "x"})[1] == "stable"
    failed = [e for e in audit(state) if e.get("result") == "failed"]
    assert failed and failed[0]["version"] == 2 and "validate" in failed[0]["steps_ms"]
    assert "swap" not in failed[0]["steps_ms"], "nothing may be written before validation passes"


def test_envoy_rejection_after_validation_restores_last_good(tmp_path: Path, envoy, backends) -> None:
    """`--mode validate` binds no sockets: a listen port taken by another process passes validation, and
    Envoy rejects the LDS update. The agent restores every file, audits it, and a later fix applies."""
    port = free_port()
    store = FileStore(str(tmp_path / "store"))
    publish(store, make_doc(backends, port, {"stable": 100, "canary": 0, "beta": 0}))
    target = envoy_target(envoy, verify_timeout=5)
    state = tmp_path / "state"
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    try:
        with running_agent_for(store, target, state, min_apply_interval=0.1, retry_initial=60) as agent:
            wait_target_live(target, 1)
            good = files_of(envoy)
            doc = make_doc(backends, port, {"stable": 0, "canary": 100, "beta": 0})
            doc["spec"]["services"].append(service("other", listen=f"127.0.0.1:{taken}",
                                                   servers={"stable": [f"127.0.0.1:{backends['stable'].port}"]}))
            publish(store, doc)
            wait_until(lambda: agent.status.last_error is not None, 20, "the apply of version 2 to fail")
            assert "rejected" in agent.status.last_error and "lds" in agent.status.last_error, agent.status.last_error
            assert files_of(envoy) == good, "every file, including the new listener's routes, is restored"
            assert target.live_version()[0] == 1
            assert Client(port).get("/", {"X-User-Id": "x"})[1] == "stable"
            assert envoy.stat("listener_manager.lds.update_rejected") == 1
            publish(store, make_doc(backends, port, {"stable": 0, "canary": 100, "beta": 0}))
            wait_target_live(target, 3)
            assert Client(port).get("/", {"X-User-Id": "x"})[1] == "canary"
            assert agent.status.healthy
    finally:
        squatter.close()
    failed = [e for e in audit(state) if e.get("result") == "failed"]
    assert failed and failed[0]["version"] == 2 and failed[0]["restored"] is True


def test_topology_changes_add_and_remove_listeners_and_clusters(tmp_path: Path, envoy, backends) -> None:
    port, port2 = free_port(), free_port()
    store = FileStore(str(tmp_path / "store"))
    target = envoy_target(envoy)
    v1 = make_doc(backends, port, {"stable": 100, "canary": 0, "beta": 0})
    publish(store, v1)
    with running_agent_for(store, target, tmp_path / "state", min_apply_interval=0.05):
        wait_target_live(target, 1)
        # A second listener, and the first service loses its beta upstream.
        v2 = make_doc({k: b for k, b in backends.items() if k != "beta"}, port, {"stable": 0, "canary": 100})
        v2["spec"]["services"].append(service("two", listen=f"127.0.0.1:{port2}", hosts=["two.example"],
                                              servers={"beta": [f"127.0.0.1:{backends['beta'].port}"]}))
        publish(store, v2)
        wait_target_live(target, 2)
        assert Client(port).get("/", {"X-User-Id": "x"})[1] == "canary"
        assert get_with_host(port2, "two.example:80") == (200, "beta")
        assert get_with_host(port2, "TWO.example.") == (200, "beta")
        assert get_with_host(port2, "one.example")[0] == 404
        clusters = json.loads(envoy.process.admin("/clusters?format=json"))["cluster_statuses"]
        assert {c["name"] for c in clusters} == {"grayagent.product.stable", "grayagent.product.canary",
                                                 "grayagent.two.beta"}
        publish(store, v1)
        wait_target_live(target, 3)
        wait_until(lambda: envoy.stat("listener_manager.total_listeners_active") == 1, 10, "one listener")
        assert sorted(p.name for p in (envoy.envoy_dir / "rds").iterdir()) == [f"{listener(port)}.json"]
        assert Client(port).get("/", {"X-User-Id": "x"})[1] == "stable"


def test_revert_through_the_cli_agent(tmp_path: Path, envoy, backends) -> None:
    port = free_port()
    store_dir = tmp_path / "store"
    store = FileStore(str(store_dir))
    publish(store, make_doc(backends, port, {"stable": 100, "canary": 0, "beta": 0}), "all stable")
    state = tmp_path / "state"
    argv = [sys.executable, "-m", "grayagent.cli", "agent", "--store", str(store_dir), "--target", "envoy",
            "--envoy-dir", str(envoy.envoy_dir), "--envoy-admin", envoy.admin_url, "--envoy-bin", envoy_binary(),
            "--state-dir", str(state), "--min-apply-interval", "0.1"]
    agent = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target = envoy_target(envoy)
    try:
        wait_target_live(target, 1)
        client = Client(port)
        assert client.get("/", {"X-User-Id": "u1"})[1] == "stable"
        publish(store, make_doc(backends, port, {"stable": 0, "canary": 100, "beta": 0}), "all canary")
        wait_target_live(target, 2)
        assert client.get("/", {"X-User-Id": "u1"})[1] == "canary"
        done = grayagent("revert", "1", "--store", str(store_dir), "-m", "canary broke checkout")
        assert done.returncode == 0 and done.stdout.strip() == "3", done.stderr
        wait_target_live(target, 3)
        assert client.get("/", {"X-User-Id": "u1"})[1] == "stable"
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0, agent.stderr.read()
    assert [(e["event"], e.get("version"), e.get("result")) for e in audit(state) if e["event"] == "apply"] == [
        ("apply", 1, "ok"), ("apply", 2, "ok"), ("apply", 3, "ok")]
    status = json.loads((state / "status.json").read_text())
    assert status["target"] == "envoy" and status["applied_version"] == 3 and status["healthy"]


def test_cli_agent_requires_envoy_dir(tmp_path: Path) -> None:
    done = grayagent("agent", "--store", str(tmp_path / "s"), "--target", "envoy", "--state-dir", str(tmp_path))
    assert done.returncode == 2 and "--envoy-dir is required" in done.stderr


def test_random_split_without_key_follows_the_weights(tmp_path: Path, envoy, backends) -> None:
    """No key, or a missing key with whenKeyMissing: random: a fresh random bucket per request, seeded per
    Lua state from /dev/urandom (LuaJIT's fixed seed would give every worker the same sequence)."""
    port = free_port()
    servers = {name: [f"127.0.0.1:{b.port}"] for name, b in backends.items()}
    doc = document(service(listen=f"127.0.0.1:{port}", servers=servers,
                           split={"key": {"query": "uid"}, "whenKeyMissing": "random",
                                  "weights": {"stable": 50, "canary": 30.5, "beta": 19.5}}))
    content = dump(doc)
    target = envoy_target(envoy)
    release = parse_document(content, "random")
    assert target.apply(target.render(release, 1, digest_of(content)), 1, digest_of(content)).ok
    counts = {"stable": 0, "canary": 0, "beta": 0}
    for i in range(3000):
        counts[Client(port).get("/")[1] if i % 2 else Client(port).get("/?x=1")[1]] += 1
    shares = {k: v / 3000 for k, v in counts.items()}
    assert abs(shares["stable"] - 0.5) < 0.04 and abs(shares["canary"] - 0.305) < 0.04, shares
    assert Client(port).get("/?uid=42")[1] == route(release.services[0], Request.build(query="uid=42")).upstream


def test_a_killed_agents_temp_files_are_removed_and_validation_leaves_none(tmp_path: Path, envoy, backends) -> None:
    """Issue 12/13: temp files of an atomic write cut short by kill -9, and the validator's private directory:
    none is left in Envoy's watched directories or in the work dir once the target is done."""
    envoy.envoy_dir.joinpath("lds").mkdir(parents=True, exist_ok=True)
    envoy.envoy_dir.joinpath("rds").mkdir(parents=True, exist_ok=True)
    leftovers = [envoy.envoy_dir / "lds" / ".lds.json.k9x2.tmp", envoy.envoy_dir / "rds" / ".grayagent_x.json.a1.tmp"]
    for path in leftovers:
        path.write_text("{")
    work = tmp_path / "state" / "tmp"
    target = envoy_target(envoy, work_dir=work)
    content = dump(make_doc(backends, free_port(), {"stable": 100, "canary": 0, "beta": 0}))
    result = target.apply(target.render(parse_document(content, "t"), 1, digest_of(content)), 1, digest_of(content))
    assert result.ok, result.error
    assert [p for p in leftovers if p.exists()] == []
    assert [p.name for p in work.iterdir()] and all(p.name.startswith("envoy-validate-") for p in work.iterdir())
    assert target._validator is not None
    target._validator.close()
    assert list(work.iterdir()) == []
