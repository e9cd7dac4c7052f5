"""End to end with a real nginx, a real directory store and the agent: publish, serve, revert, refuse, recover."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from grayagent.rules.model import parse_document
from grayagent.rules.routing import Request, route
from grayagent.runtime.agentrun import AgentOptions, reserved_listens
from grayagent.runtime.audit import read_entries, verify
from grayagent.stores.file import FileStore
from tests.agenthelp import Client, grayagent, nginx_target, running_agent, wait_live
from tests.docs import document, dump, service
from tests.servers.proc import free_port, wait_until


def make_doc(backends, port: int, weights: dict[str, float], **extra) -> dict:
    servers = {name: [f"127.0.0.1:{b.port}"] for name, b in backends.items()}
    return document(service(listen=f"127.0.0.1:{port}", servers=servers,
                            split={"key": {"header": "X-User-Id"}, "weights": weights}, **extra))


def publish(store: FileStore, doc: dict, message: str = "") -> int:
    current = store.current()
    return store.publish(dump(doc), current.version if current else 0, "test", message).version


def test_publish_serves_split_and_rules_end_to_end(tmp_path: Path, nginx, backends) -> None:
    port = free_port()
    store = FileStore(str(tmp_path / "store"))
    doc = make_doc(backends, port, {"stable": 70, "canary": 20, "beta": 10},
                   rules=[{"name": "vip", "match": {"headers": {"X-User-Tag": {"in": ["vip"]}}}, "to": "beta"}])
    svc = parse_document(dump(doc), "doc").services[0]
    publish(store, doc)
    with running_agent(store, nginx, tmp_path / "state"):
        wait_live(nginx, 1)
        client = Client(port)
        counts: dict[str, int] = {}
        for _ in range(3000):
            uid = f"user-{random.getrandbits(40)}"
            status, body = client.get("/", {"X-User-Id": uid})
            assert status == 200
            assert body == route(svc, Request.build(headers={"X-User-Id": uid})).upstream, uid
            counts[body] = counts.get(body, 0) + 1
        assert client.get("/", {"X-User-Tag": "vip", "X-User-Id": "1"})[1] == "beta"
        shares = {k: v / 3000 for k, v in counts.items()}
        assert abs(shares["stable"] - 0.7) < 0.04 and abs(shares["canary"] - 0.2) < 0.04, shares
    entries = [json.loads(line) for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    applied = [e for e in entries if e["event"] == "apply"]
    assert applied[0]["result"] == "ok" and {"render", "check", "reload", "verify"} <= set(applied[0]["steps_ms"])
    assert oct(nginx.conf.stat().st_mode & 0o777) == "0o640"


def test_revert_restores_an_earlier_version(tmp_path: Path, nginx, backends) -> None:
    port = free_port()
    store_dir = tmp_path / "store"
    store = FileStore(str(store_dir))
    publish(store, make_doc(backends, port, {"stable": 100, "canary": 0, "beta": 0}), "all stable")
    with running_agent(store, nginx, tmp_path / "state", min_apply_interval=0.1):
        wait_live(nginx, 1)
        client = Client(port)
        assert client.get("/", {"X-User-Id": "u1"})[1] == "stable"
        publish(store, make_doc(backends, port, {"stable": 0, "canary": 100, "beta": 0}), "all canary")
        wait_live(nginx, 2)
        assert client.get("/", {"X-User-Id": "u1"})[1] == "canary"
        done = grayagent("revert", "1", "--store", str(store_dir), "-m", "canary broke checkout")
        assert done.returncode == 0 and done.stdout.strip() == "3", done.stderr
        wait_live(nginx, 3)
        assert client.get("/", {"X-User-Id": "u1"})[1] == "stable"
    assert store.get(3).content == store.get(1).content
    history = json.loads(grayagent("history", "--store", str(store_dir), "-o", "json").stdout)
    assert [(h["version"], h["parent"], h["message"]) for h in history] == [
        (1, 0, "all stable"), (2, 1, "all canary"), (3, 2, "canary broke checkout")]


def test_concurrent_publishers_exactly_one_wins(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    doc = tmp_path / "doc.json"
    doc.write_bytes(dump(document()))
    assert grayagent("publish", str(doc), "--store", str(store_dir)).returncode == 0
    procs = [subprocess.Popen([sys.executable, "-m", "grayagent.cli", "publish", str(doc), "--store",
                               str(store_dir), "--expect-version", "1", "-m", f"racer {i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(8)]
    results = [(p.wait(30), p.stdout.read(), p.stderr.read()) for p in procs]
    winners = [r for r in results if r[0] == 0]
    losers = [r for r in results if r[0] == 3]
    assert len(winners) == 1 and len(losers) == 7, results
    assert winners[0][1].strip() == "2"
    assert all(r[2].startswith("grayagent: conflict: expected current version 1, but the store is at 2") for r in losers)
    assert [m.version for m in FileStore(str(store_dir)).history()] == [1, 2]


def test_bad_document_changes_nothing(tmp_path: Path, nginx, backends) -> None:
    port = free_port()
    store_dir = tmp_path / "store"
    store = FileStore(str(store_dir))
    publish(store, make_doc(backends, port, {"stable": 100, "canary": 0, "beta": 0}))
    with running_agent(store, nginx, tmp_path / "state", min_apply_interval=0.1) as agent:
        wait_live(nginx, 1)
        before_conf = nginx.conf.read_bytes()
        bad = tmp_path / "bad.yaml"
        bad.write_text("apiVersion: grayagent/v1\nkind: GrayRelease\nmetadata: {name: shop}\nspec:\n  services:\n"
                       "    - {name: product, listen: 8080, upstreams: {a: {servers: ['h:1']}}, default: b}\n")
        done = grayagent("publish", str(bad), "--store", str(store_dir))
        assert done.returncode == 1
        assert done.stderr.strip() == f"{bad}: spec.services[0].default: unknown upstream 'b'"
        assert [m.version for m in store.history()] == [1]
        # Another tool writes an invalid document straight into the store: refused, audited, not applied.
        store.publish(bad.read_bytes(), 1, "other-tool", "bypassing validation")
        wait_until(lambda: agent.status.last_error is not None, 10, "the agent to refuse version 2")
        assert "version 2 refused" in agent.status.last_error
        assert not agent.status.healthy and agent.status.applied_version == 1
        time.sleep(1.5)
        refusals = [json.loads(line) for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()
                    if '"refuse"' in line]
        assert len(refusals) == 1, "a refused version must not be retried"
        assert nginx.conf.read_bytes() == before_conf
        assert nginx_target(nginx).live_version()[0] == 1
        assert Client(port).get("/", {"X-User-Id": "x"})[1] == "stable"



def test_a_document_on_the_agents_verify_listen_is_refused(tmp_path: Path, nginx, backends) -> None:
    port = free_port()
    store = FileStore(str(tmp_path / "store"))
    publish(store, make_doc(backends, port, {"stable": 100, "canary": 0, "beta": 0}))
    options = AgentOptions(state_dir=str(tmp_path / "state"), nginx_conf=str(nginx.conf),
                           verify_listen=nginx.verify_listen)
    with running_agent(store, nginx, tmp_path / "state", min_apply_interval=0.1,
                       reserved_listens=reserved_listens(options)) as agent:
        wait_live(nginx, 1)
        before_conf = nginx.conf.read_bytes()
        # Valid on its own: only the agent knows that nginx's verify server listens there.
        publish(store, document(service(listen=nginx.verify_listen,
                                        servers={"stable": [f"127.0.0.1:{backends['stable'].port}"]})))
        wait_until(lambda: agent.status.last_error is not None, 10, "the agent to refuse version 2")
        assert "version 2 refused" in agent.status.last_error and agent.status.applied_version == 1
        refusals = [e for e in read_entries(tmp_path / "state") if e["event"] == "refuse"]
        assert len(refusals) == 1 and refusals[0]["version"] == 2, refusals
        assert "spec.services[0].listen" in refusals[0]["error"], refusals
        assert f"the agent's own --verify-listen address {nginx.verify_listen}" in refusals[0]["error"]
        assert nginx.conf.read_bytes() == before_conf
        assert nginx_target(nginx).live_version()[0] == 1
        assert Client(port).get("/", {"X-User-Id": "x"})[1] == "stable"

def test_nginx_check_failure_keeps_last_good(tmp_path: Path, nginx, backends) -> None:
    port = free_port()
    store = FileStore(str(tmp_path / "store"))
    publish(store, make_doc(backends, port, {"stable": 100, "canary": 0, "beta": 0}))
    with running_agent(store, nginx, tmp_path / "state", min_apply_interval=0.1, retry_initial=60) as agent:
        wait_live(nginx, 1)
        good_conf = nginx.conf.read_bytes()
        broken = make_doc(backends, port, {"stable": 0, "canary": 100, "beta": 0})
        broken["spec"]["services"][0]["upstreams"]["canary"]["servers"] = ["does-not-resolve.invalid:80"]
        publish(store, broken)
        wait_until(lambda: agent.status.last_error is not None, 20, "the apply of version 2 to fail")
        assert "nginx -t failed" in agent.status.last_error and "does-not-resolve.invalid" in agent.status.last_error
        assert nginx.conf.read_bytes() == good_conf
        assert nginx_target(nginx).live_version()[0] == 1
        assert Client(port).get("/", {"X-User-Id": "x"})[1] == "stable"
        time.sleep(2)
        assert agent.status.failures == 1, "a failed version is retried with backoff, not in a hot loop"
        status = json.loads((tmp_path / "state" / "status.json").read_text())
        assert status["healthy"] is False and status["applied_version"] == 1 and status["desired_version"] == 2
        publish(store, make_doc(backends, port, {"stable": 0, "canary": 100, "beta": 0}))
        wait_live(nginx, 3)
        wait_until(lambda: agent.status.healthy and agent.status.applied_version == 3, 10, "the agent to record 3")
    entries = [json.loads(line) for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    failed = [e for e in entries if e.get("result") == "failed"]
    assert failed and failed[0]["version"] == 2 and failed[0]["restored"] is True


def test_agent_restart_with_store_gone_serves_from_cache(tmp_path: Path, nginx, backends) -> None:
    port = free_port()
    store_dir = tmp_path / "store"
    store = FileStore(str(store_dir))
    publish(store, make_doc(backends, port, {"stable": 0, "canary": 100, "beta": 0}))
    state = tmp_path / "state"
    argv = [sys.executable, "-m", "grayagent.cli", "agent", "--store", str(store_dir), "--nginx-conf",
            str(nginx.conf), "--nginx-main-conf", str(nginx.main_conf), "--nginx-bin", nginx.binary,
            "--verify-listen", nginx.verify_listen, "--state-dir", str(state)]
    agent = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_live(nginx, 1)
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0, agent.stderr.read()
    # The host loses both: the store directory vanishes and nginx's file is reset.
    os.rename(store_dir, tmp_path / "store-gone")
    nginx.conf.write_text("# reset\n")
    subprocess.run([nginx.binary, "-s", "reload", "-c", str(nginx.main_conf)], check=True)
    wait_until(lambda: nginx_target(nginx).live_version() is None, 10, "nginx to drop the version endpoint")
    done = subprocess.run([*argv, "--once"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert nginx_target(nginx).live_version()[0] == 1
    assert Client(port).get("/", {"X-User-Id": "x"})[1] == "canary"
    status = json.loads((state / "status.json").read_text())
    assert status["serving_from_cache"] is True and status["applied_version"] == 1


def test_burst_of_publishes_coalesces_into_few_reloads(tmp_path: Path, nginx, backends) -> None:
    port = free_port()
    store = FileStore(str(tmp_path / "store"))
    publish(store, make_doc(backends, port, {"stable": 100, "canary": 0, "beta": 0}))
    with running_agent(store, nginx, tmp_path / "state"):
        wait_live(nginx, 1)
        time.sleep(1.2)
        before = nginx.reloads()
        for i in range(10):
            publish(store, make_doc(backends, port, {"stable": 90 - i, "canary": 10 + i, "beta": 0}))
            time.sleep(0.09)
        wait_live(nginx, 11)
        time.sleep(1.5)
        assert nginx.reloads() - before <= 2


def test_audit_detects_edit_removal_reorder_and_truncation(tmp_path: Path, nginx, backends) -> None:
    port = free_port()
    store = FileStore(str(tmp_path / "store"))
    state = tmp_path / "state"
    with running_agent(store, nginx, state, min_apply_interval=0.05):
        for n in range(1, 4):
            publish(store, make_doc(backends, port, {"stable": 100 - n, "canary": n, "beta": 0}))
            wait_live(nginx, n)
    assert verify(state) == []
    done = grayagent("audit", "verify", "--state-dir", str(state))
    assert done.returncode == 0 and done.stdout.strip().endswith("intact")
    log = state / "audit.jsonl"
    original = log.read_text().splitlines(keepends=True)

    def check(lines: list[str], expected: str) -> None:
        log.write_text("".join(lines))
        done = grayagent("audit", "verify", "--state-dir", str(state))
        assert done.returncode == 1 and expected in done.stdout, done.stdout
        log.write_text("".join(original))

    edited = original[:]
    edited[1] = edited[1].replace('"result":"ok"', '"result":"failed"')
    check(edited, "entry seq 2 was modified")
    check(original[:1] + original[2:], "does not follow the entry before it")
    check([original[0], original[2], original[1], *original[3:]], "does not follow the entry before it")
    check(original[:-1], "entries were cut off the end")
    assert grayagent("audit", "verify", "--state-dir", str(state)).returncode == 0


def test_a_candidate_left_by_a_crash_is_never_restored(tmp_path: Path, nginx, backends) -> None:
    """An agent killed between placing a candidate and checking it leaves an unchecked file; a later failed
    apply must restore what nginx last verifiably served, not that file."""
    from grayagent.stores.base import digest_of

    port = free_port()
    target = nginx_target(nginx)
    good = dump(make_doc(backends, port, {"stable": 100, "canary": 0, "beta": 0}))
    assert target.apply(target.render(parse_document(good, "good"), 1, digest_of(good)), 1, digest_of(good)).ok
    verified = nginx.conf.read_bytes()
    nginx.conf.write_text("upstream broken { server does-not-resolve.invalid:80; }\n")  # the crash's leftover
    bad_doc = make_doc(backends, port, {"stable": 0, "canary": 100, "beta": 0})
    bad_doc["spec"]["services"][0]["upstreams"]["canary"]["servers"] = ["also-unresolvable.invalid:80"]
    bad = dump(bad_doc)
    result = target.apply(target.render(parse_document(bad, "bad"), 2, digest_of(bad)), 2, digest_of(bad))
    assert not result.ok and result.restored
    assert nginx.conf.read_bytes() == verified
    assert nginx.test_config().returncode == 0
