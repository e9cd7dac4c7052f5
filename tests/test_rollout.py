"""Progressive rollouts end to end: a real nginx, real backends that can be made to fail, a real agent tailing
nginx's JSON access log and reporting per-upstream figures into a directory store, and the controller."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from grayagent.rollout import usecases as rollout
from grayagent.rollout.controller import Controller
from grayagent.rules.model import parse_document
from grayagent.runtime.agent import Agent, AgentSettings
from grayagent.stores.file import FileStore
from grayagent.targets.nginx import NginxSettings, NginxTarget
from tests.agenthelp import Client, grayagent, wait_live
from tests.docs import document, dump, service
from tests.servers.proc import free_port, wait_until


def rollout_doc(backends: dict, port: int, rollout_spec: dict[str, Any]) -> dict:
    servers = {n: [f"127.0.0.1:{backends[n].port}"] for n in ("stable", "canary")}
    return document(service(listen=f"127.0.0.1:{port}", servers=servers,
                            split={"weights": {"stable": 100, "canary": 0}}, rollout=rollout_spec))


ANALYSIS = {"interval": "0.5s", "minRequests": 20, "maxErrorRate": 0.05, "maxP99LatencyMs": 500}


@contextmanager
def gateway(tmp_path: Path, nginx, backends, spec: dict[str, Any]) -> Iterator[tuple[FileStore, dict[str, int]]]:
    """Store with version 1, an agent that serves it and reports traffic every 0.2 s, and steady traffic."""
    port = free_port()
    store = FileStore(str(tmp_path / "store"))
    store.publish(dump(rollout_doc(backends, port, spec)), 0, "test", "canary deployed at 0%")
    target = NginxTarget(NginxSettings(conf=nginx.conf, main_conf=nginx.main_conf, binary=nginx.binary,
                                       verify_listen=nginx.verify_listen, access_log=tmp_path / "access.json"))
    agent = Agent(store, target, AgentSettings(state_dir=tmp_path / "state", min_apply_interval=0.1,
                                               status_interval=0.2))
    stop = threading.Event()
    threads = [threading.Thread(target=agent.run, args=(stop,), daemon=True)]
    threads[0].start()
    wait_live(nginx, 1)
    seen: dict[str, int] = {}

    def traffic() -> None:
        client = Client(port)
        while not stop.is_set():
            status, body = client.get("/")
            key = f"{body}:{status}"
            seen[key] = seen.get(key, 0) + 1
            time.sleep(0.002)

    threads.append(threading.Thread(target=traffic, daemon=True))
    threads[1].start()
    try:
        yield store, seen
    finally:
        stop.set()
        for t in threads:
            t.join(15)


@contextmanager
def controller(store: FileStore, interval: float = 0.1) -> Iterator[Controller]:
    ctl = Controller(FileStore(store.url), interval=interval)
    stop = threading.Event()
    thread = threading.Thread(target=ctl.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield ctl
    finally:
        stop.set()
        thread.join(10)
        assert not thread.is_alive()


def phase(store: FileStore, name: str = "product") -> str:
    rec, _ = store.read_record(name)
    return str(rec["phase"]) if rec else ""


def canary_share(store: FileStore) -> float:
    current = store.current()
    assert current is not None
    split = parse_document(current.content, "current").service("product").split
    assert split is not None
    return dict(split.weights)["canary"] / 100


def controller_versions(store: FileStore) -> list[tuple[int, str]]:
    return [(m.version, m.message) for m in store.history() if m.author == "rollout-controller"]


def test_healthy_canary_walks_every_step_to_100(tmp_path: Path, nginx, backends) -> None:
    spec = {"canary": "canary", "steps": [{"weight": 10}, {"pause": "1s"}, {"weight": 50}, {"pause": "1s"},
                                          {"weight": 100}],
            "analysis": ANALYSIS, "maxDuration": "60s"}
    with gateway(tmp_path, nginx, backends, spec) as (store, seen), controller(store):
        done = grayagent("rollout", "start", "product", "--store", str(tmp_path / "store"))
        assert done.returncode == 0, done.stderr
        wait_until(lambda: phase(store) == "succeeded", 30, "the rollout to succeed")
        wait_live(nginx, store.current().version)
        backends["canary"].count = 0
        time.sleep(0.3)
        assert backends["canary"].count > 0
        stable_before = backends["stable"].count
        time.sleep(0.3)
        assert backends["stable"].count == stable_before, "stable still gets traffic at 100 %"
    assert controller_versions(store) == [(2, "rollout product: step 1/5 weight 10%"),
                                          (3, "rollout product: step 3/5 weight 50%"),
                                          (4, "rollout product: step 5/5 weight 100%")]
    assert canary_share(store) == 100
    rec, _ = store.read_record("product")
    results = [a["result"] for a in rec["analyses"]]
    assert "ok" in results and "fail" not in results, rec["analyses"]
    assert seen.get("canary:200", 0) > 50 and not any(k.endswith(":503") for k in seen)
    status = grayagent("rollout", "status", "product", "--store", str(tmp_path / "store"))
    assert status.returncode == 0 and "rollout product: succeeded  canary canary at 100%" in status.stdout
    assert "done  5. weight 100%" in status.stdout and "analysis ok" in status.stdout


def test_canary_returning_5xx_is_rolled_back_automatically(tmp_path: Path, nginx, backends) -> None:
    spec = {"canary": "canary", "steps": [{"weight": 20}, {"pause": "60s"}, {"weight": 100}],
            "analysis": ANALYSIS, "failureLimit": 1, "onFailure": "revert"}
    with gateway(tmp_path, nginx, backends, spec) as (store, _), controller(store):
        backends["canary"].fail(0.1)  # one answer in ten is a 503
        rollout.start(store, "product")
        wait_until(lambda: canary_share(store) == 20, 10, "step 1 published")
        started = time.monotonic()
        wait_until(lambda: phase(store) == "rolled-back", 20, "the automatic rollback")
        elapsed = time.monotonic() - started
        # Two failed windows of >= 20 canary requests (~1 s each at 20 %), each judged at a 0.5 s tick.
        assert elapsed < 8, elapsed
        wait_live(nginx, store.current().version)
        canary_before = backends["canary"].count
        time.sleep(0.5)
        assert backends["canary"].count == canary_before, "the canary still gets traffic after the rollback"
    assert store.current().content == store.get(1).content
    assert controller_versions(store) == [
        (2, "rollout product: step 1/3 weight 20%"),
        (3, "rollout product: rolled back (analysis failed 2 times (failureLimit 1)): revert to version 1")]
    rec, _ = store.read_record("product")
    failed = [a for a in rec["analyses"] if a["result"] == "fail"]
    assert len(failed) == 2 and all("canary 5xx ratio" in a["reasons"][0] for a in failed)
    assert all(0.05 < a["canary"]["error_rate"] < 0.2 for a in failed), failed


def test_slow_canary_is_rolled_back_on_p99(tmp_path: Path, nginx, backends) -> None:
    spec = {"canary": "canary", "steps": [{"weight": 30}, {"pause": "60s"}, {"weight": 100}],
            "analysis": {**ANALYSIS, "maxP99LatencyMs": 150}, "onFailure": "zero"}
    with gateway(tmp_path, nginx, backends, spec) as (store, _), controller(store):
        backends["canary"].slow(0.2)
        rollout.start(store, "product")
        wait_until(lambda: phase(store) == "rolled-back", 20, "the rollback on latency")
    assert canary_share(store) == 0
    rec, _ = store.read_record("product")
    failed = [a for a in rec["analyses"] if a["result"] == "fail"]
    assert failed and failed[0]["reasons"][0].startswith("canary p99 2") and failed[0]["canary"]["error_rate"] == 0


def test_max_duration_triggers_a_timed_rollback(tmp_path: Path, nginx, backends) -> None:
    spec = {"canary": "canary", "steps": [{"weight": 10}, {"pause": "manual"}, {"weight": 100}],
            "analysis": ANALYSIS, "maxDuration": "2s", "onFailure": "zero"}
    with gateway(tmp_path, nginx, backends, spec) as (store, _), controller(store):
        rollout.start(store, "product")
        started = time.monotonic()
        wait_until(lambda: phase(store) == "rolled-back", 10, "the timed rollback")
        assert 2 <= time.monotonic() - started < 4
    assert canary_share(store) == 0
    rec, _ = store.read_record("product")
    assert rec["reason"] == "maxDuration 2s exceeded"
    assert controller_versions(store)[-1][1] == "rollout product: rolled back (maxDuration 2s exceeded): canary weight 0%"
    watched = grayagent("rollout", "status", "product", "--watch", "--store", str(tmp_path / "store"), timeout=10)
    assert watched.returncode == 4 and "rollout product: rolled-back" in watched.stdout  # --watch: 4, rolled back
    assert "reason: maxDuration 2s exceeded" in watched.stdout


def test_manual_gate_waits_for_promote_and_a_restarted_controller_resumes(tmp_path: Path, nginx, backends) -> None:
    spec = {"canary": "canary", "steps": [{"weight": 5}, {"pause": "manual"}, {"weight": 100}], "analysis": ANALYSIS}
    store_dir = str(tmp_path / "store")
    with gateway(tmp_path, nginx, backends, spec) as (store, _):
        assert grayagent("rollout", "start", "product", "--store", store_dir).returncode == 0
        with controller(store):
            wait_until(lambda: store.read_record("product")[0]["step"] == 1, 10, "the manual gate")
            time.sleep(1.0)
        # The controller is gone mid-rollout; a new one must pick up at the gate without republishing step 1.
        assert controller_versions(store) == [(2, "rollout product: step 1/3 weight 5%")]
        with controller(store):
            time.sleep(1.0)
            assert phase(store) == "progressing" and store.read_record("product")[0]["step"] == 1
            status = json.loads(grayagent("rollout", "status", "--store", store_dir, "-o", "json").stdout)
            assert status[0]["step"] == 1 and status[0]["weight"] == 500
            done = grayagent("rollout", "promote", "product", "--store", store_dir)
            assert done.returncode == 0, done.stderr
            wait_until(lambda: phase(store) == "succeeded", 10, "the rollout to finish after promote")
    assert controller_versions(store) == [(2, "rollout product: step 1/3 weight 5%"),
                                          (3, "rollout product: step 3/3 weight 100%")]
    assert canary_share(store) == 100


def test_pause_resume_and_abort(tmp_path: Path, nginx, backends) -> None:
    spec = {"canary": "canary", "steps": [{"weight": 10}, {"pause": "3s"}, {"weight": 30}, {"pause": "manual"}],
            "analysis": ANALYSIS}
    store_dir = str(tmp_path / "store")
    with gateway(tmp_path, nginx, backends, spec) as (store, _), controller(store):
        assert grayagent("rollout", "start", "product", "--store", store_dir).returncode == 0
        # In-process, so that the request surely lands inside the 3 s pause (a CLI start takes seconds on a
        # loaded host); `resume` and `abort` below go through the CLI.
        rollout.request(store, "product", "pause")
        wait_until(lambda: phase(store) == "paused", 10, "the pause")
        time.sleep(3.0)
        assert canary_share(store) <= 10  # held: the 3 s pause would have run out by now
        assert grayagent("rollout", "resume", "product", "--store", store_dir).returncode == 0
        wait_until(lambda: canary_share(store) == 30, 10, "step 3 after resume")
        done = grayagent("rollout", "abort", "product", "--store", store_dir)
        assert done.returncode == 0, done.stderr
        wait_until(lambda: phase(store) == "aborted", 10, "the abort")
        wait_live(nginx, store.current().version)
    assert store.current().content == store.get(1).content
    again = grayagent("rollout", "abort", "product", "--store", store_dir)
    assert again.returncode == 2 and "already ended: aborted" in again.stderr


def test_two_controllers_never_both_act_and_the_second_takes_over(tmp_path: Path, backends) -> None:
    store = FileStore(str(tmp_path / "store"))
    spec = {"canary": "canary", "steps": [{"weight": 10}, {"pause": "0.6s"}, {"weight": 20}, {"pause": "0.6s"},
                                          {"weight": 30}, {"pause": "0.6s"}, {"weight": 100}]}
    store.publish(dump(rollout_doc(backends, free_port(), spec)), 0, "test", "")
    rollout.start(store, "product")
    with controller(store) as first:
        with controller(store) as second:
            wait_until(lambda: canary_share(store) == 20, 10, "two steps")
            assert (first.ticks > 0) != (second.ticks > 0), (first.ticks, second.ticks)
            leader, follower = (first, second) if first.ticks else (second, first)
        # `second` stopped (and released its lock if it led); whichever remains finishes the rollout.
        wait_until(lambda: phase(store) == "succeeded", 15, "the rollout to finish")
        if leader is second:
            assert follower.ticks > 0, "the follower did not take over"
    messages = [m for _, m in controller_versions(store)]
    assert messages == [f"rollout product: step {i}/7 weight {w}%" for i, w in ((1, 10), (3, 20), (5, 30), (7, 100))]


def test_controller_processes_killed_and_restarted_resume_and_never_both_act(tmp_path: Path, backends) -> None:
    """`grayagent rollout run` as processes: two at once, the leader killed -9 mid-rollout, the rest resumes."""
    import os
    import signal
    import subprocess
    import sys

    store_dir = str(tmp_path / "store")
    store = FileStore(store_dir)
    spec = {"canary": "canary", "steps": [{"weight": 10}, {"pause": "1s"}, {"weight": 20}, {"pause": "1s"},
                                          {"weight": 30}, {"pause": "1.5s"}, {"weight": 100}]}
    store.publish(dump(rollout_doc(backends, free_port(), spec)), 0, "test", "")
    env = {**os.environ, "GRAYAGENT_STORE": store_dir}

    def run(i: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "grayagent.cli", "rollout", "run", "--interval", "0.1",
                                 "--state-dir", str(tmp_path / f"ctl{i}")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    procs = [run(0), run(1)]
    try:
        # No agent serves this store: the pre-flight's fleet item fails, so the start is forced.
        assert grayagent("rollout", "start", "product", "--force", "--reason", "no gateways in this test",
                         env=env).returncode == 0
        wait_until(lambda: canary_share(store) == 20, 10, "two steps")
        leader_line = (tmp_path / "store" / "rollouts" / ".leader").read_text()
        leader = next(p for p in procs if f":{p.pid}:" in leader_line)
        leader.send_signal(signal.SIGKILL)  # no cleanup at all: the kernel drops its flock
        leader.wait(10)
        wait_until(lambda: phase(store) == "succeeded", 15, "the survivor to finish the rollout")
        survivor = next(p for p in procs if p is not leader)
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(10) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    logs = {p.pid: p.stdout.read() for p in procs}
    assert sum("leading rollouts" in text for text in logs.values()) == 2, logs  # one after the other
    messages = [m for _, m in controller_versions(store)]
    assert messages == [f"rollout product: step {i}/7 weight {w}%" for i, w in ((1, 10), (3, 20), (5, 30), (7, 100))]
    # Each controller audited what it did; together, every step exactly once.
    audited = []
    for i in range(2):
        if (tmp_path / f"ctl{i}" / "audit.jsonl").exists():
            assert grayagent("audit", "verify", "--state-dir", str(tmp_path / f"ctl{i}")).returncode == 0
            entries = [json.loads(line) for line in (tmp_path / f"ctl{i}" / "audit.jsonl").read_text().splitlines()]
            audited += [e["version"] for e in entries if e["event"] == "rollout-step"]
    assert sorted(audited) == [2, 3, 4, 5]
