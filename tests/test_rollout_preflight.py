"""The rollout pre-flight checklist (`grayagent rollout check`, run by `rollout start`): each item's logic, then
the CLI against a real directory store with a real agent on nginx, a real Prometheus, and a real etcd."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from grayagent.rollout import preflight
from grayagent.rollout import usecases as rollout
from grayagent.rollout.controller import Controller
from grayagent.rules.model import parse_document
from grayagent.runtime.agent import Agent, AgentSettings
from grayagent.runtime.audit import AuditLog, read_entries
from grayagent.stores.etcd import EtcdStore
from grayagent.stores.file import FileStore
from grayagent.targets.nginx import NginxSettings, NginxTarget
from tests.agenthelp import grayagent, wait_live
from tests.docs import document, dump, service
from tests.servers.etcd import EtcdCluster
from tests.servers.proc import ManagedProcess, free_port, wait_until
from tests.test_rollout_units import Clock, Scripted, doc

SHANGHAI = ZoneInfo("Asia/Shanghai")
OFFICE = {"timezone": "Asia/Shanghai", "allow": [{"days": ["mon", "tue", "wed", "thu", "fri"], "from": "10:00",
                                                  "to": "16:00"}]}
ALWAYS = {"timezone": "UTC", "allow": [{"from": "00:00", "to": "24:00"}]}
NEVER_NOW = {"timezone": "UTC", "allow": [{"days": ["mon"], "from": "00:00", "to": "00:01"}]}
SPEC = {"canary": "canary", "steps": [{"weight": 10}, {"pause": "1m"}, {"weight": 100}]}


def lines(items: list[preflight.Item]) -> list[str]:
    return [i.line() for i in items]


def published(tmp_path: Path, spec: dict[str, Any]) -> FileStore:
    store = FileStore(str(tmp_path / "store"))
    store.publish(doc(spec), 0, "test", "")
    return store


def rollout_spec(store: FileStore) -> Any:
    current = store.current()
    assert current is not None
    return current, parse_document(current.content, "d").service("product").rollout


# ---------------------------------------------------------------------------------------------- each item


def test_window_item() -> None:
    spec = parse_document(doc({**SPEC, "windows": OFFICE}), "d").services[0].rollout
    assert spec is not None
    wednesday_noon = datetime(2026, 12, 2, 12, 0, tzinfo=SHANGHAI).timestamp()
    assert preflight.window_item(spec, wednesday_noon).line() == (
        "ok    window: open until 2026-12-02 16:00+08:00 Asia/Shanghai (2026-12-02 08:00 UTC)")
    assert preflight.window_item(spec, wednesday_noon + 5 * 3600).line() == (
        "FAIL  window: closed (outside the allow windows); the next step may run at 2026-12-03 10:00+08:00 "
        "Asia/Shanghai (2026-12-03 02:00 UTC)")
    plain = parse_document(doc(SPEC), "d").services[0].rollout
    assert plain is not None
    assert preflight.window_item(plain, 0).line() == "ok    window: no release windows: steps may run at any time"


def test_rollback_item_revert_zero_and_a_broken_chain(tmp_path: Path) -> None:
    store = published(tmp_path, SPEC)
    current, spec = rollout_spec(store)
    assert preflight.rollback_item(store, current, spec, "product", None).line() == (
        "ok    rollback: onFailure revert: version 1 exists, validates, and its history chain is intact")
    zero = published(tmp_path / "z", {**SPEC, "onFailure": "zero"})
    current_z, spec_z = rollout_spec(zero)
    assert preflight.rollback_item(zero, current_z, spec_z, "product", None).line() == (
        "ok    rollback: onFailure zero: version 1 with canary at 0% validates")
    # A rollout in progress reverts to its own base version: one that was edited in the store fails.
    store.publish(doc({**SPEC, "failureLimit": 2}), 1, "test", "")
    rec = rollout.start(store, "product")
    assert rec.base_version == 2
    entry = tmp_path / "store" / "versions" / "0000000001.json"
    entry.write_bytes(entry.read_bytes().replace(b"9002", b"9003"))  # an edit behind the store's back
    item = preflight.rollback_item(store, store.current(), spec, "product", rec)  # type: ignore[arg-type]
    assert item.ok  # version 2 itself is intact; its parent is not the target
    rec.base_version = 1
    item = preflight.rollback_item(store, store.current(), spec, "product", rec)  # type: ignore[arg-type]
    assert not item.ok and item.line().startswith("FAIL  rollback: onFailure revert: version 1: "), item.line()
    rec.base_version = 9
    item = preflight.rollback_item(store, store.current(), spec, "product", rec)  # type: ignore[arg-type]
    assert not item.ok and "version 9" in item.detail


def test_fleet_item_from_reports(tmp_path: Path) -> None:
    store = published(tmp_path, SPEC)
    assert preflight.fleet_item(store).line() == (
        "FAIL  fleet: no agent reports to this store (are the agents running against it?)")
    store.report("gw-1", {"host": "gw-1", "applied_version": 1, "healthy": True, "state": "healthy"})
    assert preflight.fleet_item(store).line() == "ok    fleet: 1 agent healthy on version 1"
    store.report("gw-2", {"host": "gw-2", "applied_version": 0, "healthy": False, "state": "degraded",
                          "reason": "version 1 failed nginx -t"})
    assert preflight.fleet_item(store).line() == (
        "FAIL  fleet: 1 of 2 agents not healthy on version 1: gw-2 degraded on version 0 (version 1 failed nginx -t)")


def test_metric_items_without_analysis_and_without_figures(tmp_path: Path) -> None:
    store = published(tmp_path, SPEC)
    _, spec = rollout_spec(store)
    assert lines(preflight.metric_items(spec, store, "product")) == [
        "ok    metrics: no analysis configured: nothing to query"]
    store = published(tmp_path / "a", {**SPEC, "analysis": {"interval": "10s", "maxErrorRate": 0.05}})
    _, spec = rollout_spec(store)
    assert lines(preflight.metric_items(spec, store, "product")) == [
        "FAIL  metrics: agents' traffic figures: no agent reports, so none sends traffic figures (agent option "
        "nginx_access_log or envoy_traffic_stats), so the analysis could never judge"]
    store.report("gw-1", {"host": "gw-1", "traffic": {"boot": "b", "upstreams": {}}})
    assert lines(preflight.metric_items(spec, store, "product")) == [
        "ok    metrics: agents' traffic figures: 1 of 1 agents send traffic figures"]


@contextmanager
def prometheus(tmp_path: Path) -> Iterator[str]:
    """A real Prometheus (Debian's package) with nothing to scrape: instant queries of constants answer."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text("global: {scrape_interval: 1m}\n")
    proc = ManagedProcess([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                           f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], tmp_path / "prom.log")
    proc.start()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False
    try:
        wait_until(ready, 30, "prometheus to be ready")
        yield url
    finally:
        proc.stop()


def test_every_prometheus_query_is_asked_now_for_canary_and_stable(tmp_path: Path) -> None:
    with prometheus(tmp_path) as url:
        analysis = {"interval": "30s", "maxErrorRate": 0.05, "maxP99LatencyMs": 300,
                    "prometheus": {"url": url,
                                   "errorRateQuery": 'sum(up{job="{{service}}-{{upstream}}"})',  # empty: no data
                                   "p99Query": "vector(0.25)",
                                   "requestsQuery": "sum(rate(requests[{{interval}}]"}}          # a syntax error
        store = published(tmp_path, {**SPEC, "analysis": analysis})
        _, spec = rollout_spec(store)
        got = lines(preflight.metric_items(spec, store, "product"))
    assert got[0] == f"ok    metrics: errorRateQuery for canary at {url}: answers (no data yet)"
    assert got[1] == f"ok    metrics: p99Query for canary at {url}: answers 0.25"
    assert got[2].startswith(f"FAIL  metrics: requestsQuery for canary at {url}: prometheus {url}: HTTP Error 400")
    assert [g.split(" for ")[1].split(" ")[0] for g in got] == ["canary"] * 3 + ["stable"] * 3
    # Nothing listens: every query fails with its reason.
    dead = published(tmp_path / "dead", {**SPEC, "analysis": {"interval": "30s", "maxErrorRate": 0.05, "prometheus": {
        "url": f"http://127.0.0.1:{free_port()}", "errorRateQuery": "vector(1)"}}})
    _, spec = rollout_spec(dead)
    got = lines(preflight.metric_items(spec, dead, "product"))
    assert len(got) == 2 and all(g.startswith("FAIL  metrics: errorRateQuery") and "refused" in g for g in got), got


# ---------------------------------------------------------------------------------------------- the CLI


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and "agents" not in p.parts}


def test_a_refused_start_changes_nothing_and_a_forced_one_is_recorded_and_audited(tmp_path: Path) -> None:
    store = published(tmp_path, {**SPEC, "windows": NEVER_NOW})
    # An ended rollout is in the store: a refused start must leave its record as it was.
    store.write_record("product", {"service": "product", "phase": "aborted", "steps": ["weight 10%"]}, 0)
    before = files(tmp_path / "store")
    check = grayagent("rollout", "check", "product", "--store", store.url)
    assert check.returncode == 7
    assert [line.split(":")[0] for line in check.stdout.splitlines()] == [
        "ok    metrics", "ok    rollback", "FAIL  window", "FAIL  fleet"]
    refused = grayagent("rollout", "start", "product", "--store", store.url)
    assert refused.returncode == 7 and refused.stdout.splitlines() == check.stdout.splitlines()[2:]
    assert refused.stderr == ("grayagent: rollout product: not started, 2 pre-flight items failed (grayagent rollout "
                              "check product); fix them, or start with --force --reason TEXT\n")
    for flags in (["--force"], ["--reason", "x"], ["--force", "--reason", " "]):
        usage = grayagent("rollout", "start", "product", "--store", store.url, *flags)
        assert usage.returncode == 2 and usage.stderr == (
            "grayagent: --force and --reason TEXT go together: give both to start past a failed pre-flight\n")
    assert files(tmp_path / "store") == before

    forced = grayagent("rollout", "start", "product", "--store", store.url, "--force", "--reason", "INC-7 hotfix",
                       "-o", "json")
    assert forced.returncode == 0, forced.stderr
    rec = json.loads(forced.stdout)
    assert rec["forced"]["reason"] == "INC-7 hotfix" and "@" in rec["forced"]["by"]
    assert [line[:12] for line in rec["forced"]["failed"]] == ["FAIL  window", "FAIL  fleet:"]
    assert "FORCED past a failed pre-flight (window, fleet); reason: INC-7 hotfix" in rec["events"][-1]["message"]
    # The controller writes the forced start into its audit log at its first tick.
    (tmp_path / "ctl").mkdir()
    audit = AuditLog(tmp_path / "ctl")
    Controller(store, clock=Clock(), sources=lambda _: Scripted(), audit=audit).tick()
    entries = [e for e in read_entries(tmp_path / "ctl") if e["event"] == "rollout-forced-start"]
    assert len(entries) == 1 and entries[0]["reason"] == "INC-7 hotfix" and entries[0]["service"] == "product"
    assert entries[0]["failed"] == rec["forced"]["failed"] and entries[0]["base_version"] == 1


def test_check_and_start_pass_with_a_real_agent_on_nginx(tmp_path: Path, nginx: Any, backends: Any) -> None:
    port = free_port()
    servers = {n: [f"127.0.0.1:{backends[n].port}"] for n in ("stable", "canary")}
    spec = {**SPEC, "analysis": {"interval": "10s", "maxErrorRate": 0.05}, "windows": ALWAYS}
    store = FileStore(str(tmp_path / "store"))
    store.publish(dump(document(service(listen=f"127.0.0.1:{port}", servers=servers,
                                        split={"weights": {"stable": 100, "canary": 0}}, rollout=spec))), 0, "t", "")
    target = NginxTarget(NginxSettings(conf=nginx.conf, main_conf=nginx.main_conf, binary=nginx.binary,
                                       verify_listen=nginx.verify_listen, access_log=tmp_path / "access.json"))
    agent = Agent(store, target, AgentSettings(state_dir=tmp_path / "state", status_interval=0.2))
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_live(nginx, 1)
        wait_until(lambda: all(i.ok for i in rollout.check(store, "product")), 15, "every item to pass")
        done = grayagent("rollout", "check", "product", "--store", store.url, "-o", "json")
        assert done.returncode == 0, done.stdout
        report = json.loads(done.stdout)
        assert report["ok"] and [i["item"] for i in report["items"]] == ["metrics", "rollback", "window", "fleet"]
        assert report["items"][3]["detail"] == "1 agent healthy on version 1"
        started = grayagent("rollout", "start", "product", "--store", store.url)
        assert started.returncode == 0, started.stderr
        assert started.stdout == "rollout product: started from version 1 (3 steps); the controller publishes them\n"
    finally:
        stop.set()
        thread.join(15)
    # The agent is gone but its last report stands until it expires: a new version finds it behind.
    store.publish(doc(spec), 1, "t", "")
    assert preflight.fleet_item(store).detail.startswith(
        f"1 of 1 agents not healthy on version 2: {store.fleet()[0]['host']} healthy on version 1 (")


def test_check_and_start_on_etcd(tmp_path: Path) -> None:
    with EtcdCluster(tmp_path / "etcd", size=1) as cluster:
        store = EtcdStore(f"etcd://{cluster.endpoints[0]}/grayagent/shop")
        try:
            store.publish(doc({**SPEC, "windows": ALWAYS}), 0, "test", "")
            check = grayagent("rollout", "check", "product", "--store", store.url)
            assert check.returncode == 7 and check.stdout.splitlines()[-1].startswith("FAIL  fleet: no agent")
            refused = grayagent("rollout", "start", "product", "--store", store.url)
            assert refused.returncode == 7 and store.read_record("product") == (None, 0)
            store.report("gw-1", {"host": "gw-1", "applied_version": 1, "healthy": True, "state": "healthy"})
            assert grayagent("rollout", "start", "product", "--store", store.url).returncode == 0
            assert store.read_record("product")[0]["phase"] == "progressing"  # type: ignore[index]
        finally:
            store.close()
