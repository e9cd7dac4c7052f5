"""Rollout units: spec parsing, durations, analysis math, document rewriting, metric sources, and the controller
driven by an injected clock and fake figures (no proxy, no sleeping)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fastjsonschema
import jsonschema
import pytest

from grayagent.cli_rollout import format_rollout_status
from grayagent.errors import Conflict, InvalidDocument, StoreError, UsageError
from grayagent.rollout import usecases as rollout
from grayagent.rollout.analysis import Measurement, judge, measurement_from_counters, quantile
from grayagent.rollout.controller import Controller
from grayagent.rollout.document import canary_weight, set_canary_weight
from grayagent.rollout.record import KEEP_ANALYSES, RolloutRecord
from grayagent.rollout.sources import FleetSource, PrometheusSource, parse_query_result
from grayagent.rules.model import Analysis, PrometheusQueries, parse_document, parse_duration, schema
from grayagent.stores.base import RecordConflict
from grayagent.stores.file import FileStore
from tests.docs import document, dump, service

SPLIT = {"weights": {"stable": 100, "canary": 0}}


def doc(rollout_spec: dict[str, Any], split: dict[str, Any] | None = None, **extra: Any) -> bytes:
    return dump(document(service(split=split or SPLIT, rollout=rollout_spec, **extra)))


def problems(content: bytes) -> list[str]:
    with pytest.raises(InvalidDocument) as info:
        parse_document(content, "d")
    return [str(p) for p in info.value.problems]


# ---------------------------------------------------------------------------------------------- spec


def test_durations() -> None:
    assert parse_duration("30s") == 30 and parse_duration("5m") == 300 and parse_duration("1h") == 3600
    assert parse_duration("500ms") == 0.5 and parse_duration("0.5s") == 0.5
    for bad in ("30", "s", "1d", "-1s", "1 s"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_full_spec_parses() -> None:
    spec = {"canary": "canary", "stable": "stable",
            "steps": [{"weight": 1}, {"pause": "30s"}, {"weight": 12.5}, {"pause": "manual"}, {"weight": 100}],
            "analysis": {"interval": "1m", "minRequests": 100, "maxErrorRate": 0.01, "maxP99LatencyMs": 250,
                         "relativeTo": "stable", "maxErrorRateFactor": 2, "maxP99LatencyFactor": 1.5,
                         "prometheus": {"url": "http://prom:9090", "errorRateQuery": "e", "p99Query": "p",
                                        "requestsQuery": "r"}},
            "failureLimit": 2, "maxDuration": "2h", "onFailure": "zero"}
    data = json.loads(doc(spec))
    fastjsonschema.compile(schema())(data)
    jsonschema.Draft7Validator(schema()).validate(data)
    ro = parse_document(doc(spec), "d").services[0].rollout
    assert ro is not None
    assert [s.describe() for s in ro.steps] == ["weight 1%", "pause 30s", "weight 12.5%", "pause until promoted",
                                                "weight 100%"]
    assert ro.steps[2].weight == 1250 and ro.max_duration == 7200 and ro.on_failure == "zero"
    assert ro.analysis == Analysis(60, 100, 0.01, 250, True, 2, 1.5, PrometheusQueries("http://prom:9090", "e", "p",
                                                                                     "r"))
    assert parse_document(doc({"canary": "canary", "steps": [{"weight": 5}]}), "d").services[0].rollout.stable \
        == "stable"  # the service's default


def test_spec_problems_name_the_field() -> None:
    assert problems(doc({"canary": "nope", "steps": [{"weight": 5}]})) == [
        "d: spec.services[0].rollout.canary: unknown upstream 'nope'",
        "d: spec.services[0].split.weights: the rollout needs a weight for 'nope'"]
    assert problems(doc({"canary": "stable", "steps": [{"weight": 5}]})) == [
        "d: spec.services[0].rollout.canary: the canary and the stable upstream are both 'stable'"]
    assert problems(dump(document(service(rollout={"canary": "canary", "steps": [{"weight": 5}]})))) == [
        "d: spec.services[0].rollout: a rollout ramps the service's split; add a split whose weights name 'stable' "
        "and 'canary'"]
    assert problems(doc({"canary": "canary", "steps": [{"weight": 5.555}, {"weight": 95}]},
                        {"weights": {"beta": 10, "stable": 90, "canary": 0}},
                        servers={"stable": ["h:1"], "canary": ["h:2"], "beta": ["h:3"]})) == [
        "d: spec.services[0].rollout.steps[0].weight: 5.555 has more than two decimals",
        "d: spec.services[0].rollout.steps[1].weight: 95% plus the other upstreams' 10% exceeds 100"]
    assert problems(doc({"canary": "canary", "steps": [{"weight": 5, "pause": "1s"}]})) == [
        "d: spec.services[0].rollout.steps[0]: a pause stands alone; got weight, pause"]
    assert problems(doc({"canary": "canary", "steps": [], "onFailure": "explode", "maxDuration": "1 day"}))
    assert problems(doc({"canary": "canary", "steps": [{"weight": 5}],
                         "analysis": {"interval": "1s", "maxErrorRateFactor": 2}})) == [
        "d: spec.services[0].rollout.analysis.maxErrorRateFactor: needs relativeTo: stable"]
    assert problems(doc({"canary": "canary", "steps": [{"weight": 5}], "analysis": {"interval": "1s"}})) == [
        "d: spec.services[0].rollout.analysis: give at least one threshold: maxErrorRate, maxP99LatencyMs, or a factor"]


# ---------------------------------------------------------------------------------------------- analysis math


def test_quantile_interpolates_like_histogram_quantile() -> None:
    bounds = [0.1, 0.2, 0.5]
    assert quantile(0.99, bounds, [0, 0, 0, 0]) is None
    assert quantile(0.5, bounds, [50, 100, 100, 100]) == pytest.approx(0.1)
    assert quantile(0.99, bounds, [0, 100, 100, 100]) == pytest.approx(0.199)
    assert quantile(0.99, bounds, [90, 90, 90, 100]) == 0.5  # in +Inf: the top finite bound
    m = measurement_from_counters(200, 10, bounds, [100, 198, 200, 200])
    assert m.requests == 200 and m.error_rate == 0.05 and m.p99_ms == pytest.approx(200.0)


def test_judge_absolute_relative_and_inconclusive() -> None:
    spec = Analysis(1, min_requests=50, max_error_rate=0.05, max_p99_latency_ms=300)
    assert judge(spec, Measurement(49, 0.5, 900), None).result == "inconclusive"
    assert judge(spec, Measurement(100, 0.05, 300), None).result == "ok"
    verdict = judge(spec, Measurement(100, 0.1, 301), None)
    assert verdict.result == "fail" and verdict.reasons == ("canary 5xx ratio 0.1000 > 0.05",
                                                            "canary p99 301.0ms > 300ms")
    rel = Analysis(1, min_requests=10, relative_to_stable=True, max_error_rate_factor=2, max_p99_latency_factor=1.5)
    assert judge(rel, Measurement(100, 0.03, 100), Measurement(100, 0.02, 80)).result == "ok"
    assert judge(rel, Measurement(100, 0.001, 100), Measurement(100, 0.0, 80)).result == "ok"  # under the floor
    assert judge(rel, Measurement(100, 0.05, 100), Measurement(100, 0.02, 80)).reasons == (
        "canary 5xx ratio 0.0500 > 2 x stable's 0.0200",)
    assert judge(rel, Measurement(100, 0.0, 200), Measurement(100, 0.0, 100)).result == "fail"
    assert judge(rel, Measurement(100, 0.5, 900), Measurement(5, 0.0, 1)).result == "ok"  # stable too quiet
    assert judge(spec, Measurement(None, None, None), None).result == "inconclusive"


# ---------------------------------------------------------------------------------------------- document


def test_set_canary_weight_changes_only_the_weights() -> None:
    yaml_doc = (b"apiVersion: grayagent/v1\nkind: GrayRelease\nmetadata: {name: shop}\nspec:\n  services:\n"
                b"  - name: product\n    listen: 8080\n    upstreams: {stable: {servers: ['h:1']}, canary: {servers: "
                b"['h:2']}, beta: {servers: ['h:3']}}\n    default: stable\n    split: {key: {header: X-U}, "
                b"weights: {beta: 10, stable: 90, canary: 0}}\n"
                b"    rollout: {canary: canary, steps: [{weight: 12.34}]}\n")
    out = set_canary_weight(yaml_doc, "d", "product", "canary", "stable", 1234)
    before, after = parse_document(yaml_doc, "d").services[0], parse_document(out, "d").services[0]
    assert after.split is not None and before.split is not None
    assert dict(after.split.weights) == {"stable": 7766, "beta": 1000, "canary": 1234}
    assert after.split.key == before.split.key and after.rules == before.rules and after.rollout == before.rollout
    assert not out.startswith(b"{")  # YAML stays YAML
    assert canary_weight(out, "d", "product", "canary") == 1234
    assert set_canary_weight(doc({"canary": "canary", "steps": [{"weight": 1}]}), "d", "product", "canary", "stable",
                             10000).startswith(b"{")


# ---------------------------------------------------------------------------------------------- sources


class FakeFleet:
    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def report(self, host: str, status: dict[str, object]) -> None:
        pass

    def fleet(self) -> list[dict[str, Any]]:
        return self.entries


def traffic(boot: str, canary: tuple[int, int], stable: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    def counters(requests: int, errors: int) -> dict[str, Any]:
        return {"requests": requests, "errors_5xx": errors, "latency_sum": 0, "latency_buckets": [requests, requests]}
    return {"boot": boot, "latency_le": [0.1],
            "upstreams": {"product/canary": counters(*canary), "product/stable": counters(*stable)}}


def test_fleet_source_sums_hosts_and_survives_agent_restarts() -> None:
    fleet = FakeFleet()
    source = FleetSource(fleet)
    spec = Analysis(1, min_requests=50, max_error_rate=0.1)
    fleet.entries = [{"host": "a", "traffic": traffic("b1", (100, 1))}, {"host": "b", "traffic": traffic("b2", (10, 0))}]
    measured, window = source.measure("product", ("canary", "stable"), None, spec)
    assert measured is None  # the first sample only opens the window
    fleet.entries = [{"host": "a", "traffic": traffic("b1", (130, 4))}, {"host": "b", "traffic": traffic("b2", (20, 0))}]
    measured, window2 = source.measure("product", ("canary", "stable"), window, spec)
    assert measured is not None and measured[0].requests == 40
    assert window2["sample"] == window["sample"]  # 40 < minRequests: the window keeps growing
    # Host b restarted (new boot, counters from zero); host c is new.
    fleet.entries = [{"host": "a", "traffic": traffic("b1", (150, 6))}, {"host": "b", "traffic": traffic("b3", (5, 5))},
                     {"host": "c", "traffic": traffic("b4", (5, 0))}, {"host": "d"}]
    measured, window3 = source.measure("product", ("canary", "stable"), window2, spec)
    assert measured is not None
    canary = measured[0]
    # b counts from zero (its boot changed); c was never seen, so its counters so far are its baseline.
    assert canary.requests == 50 + 5 and canary.error_rate == pytest.approx(10 / 55)
    assert window3 != window2


class FakePrometheus(BaseHTTPRequestHandler):
    answers: dict[str, Any] = {}

    def do_GET(self) -> None:
        from urllib.parse import parse_qs, urlsplit

        query = parse_qs(urlsplit(self.path).query)["query"][0]
        body = json.dumps(self.answers.get(query, {"status": "success",
                                                   "data": {"resultType": "vector", "result": []}})).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def vector(*values: str) -> dict[str, Any]:
    return {"status": "success", "data": {"resultType": "vector",
                                          "result": [{"metric": {}, "value": [1, v]} for v in values]}}


def test_prometheus_source_against_a_fake_server() -> None:
    FakePrometheus.answers = {
        'err{upstream="canary",svc="product",w="5s"}': vector("0.02", "0.01"),
        'err{upstream="stable",svc="product",w="5s"}': vector("NaN"),
        'p99{upstream="canary"}': vector("0.25"),
        'req{upstream="canary"}': {"status": "success", "data": {"resultType": "scalar", "result": [1, "420"]}},
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakePrometheus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        queries = PrometheusQueries(f"http://127.0.0.1:{server.server_address[1]}/",
                                    'err{upstream="{{upstream}}",svc="{{service}}",w="{{interval}}"}',
                                    'p99{upstream="{{upstream}}"}', 'req{upstream="{{upstream}}"}')
        measured, _ = PrometheusSource(queries).measure("product", ("canary", "stable"), None, Analysis(5))
        assert measured is not None
        canary, stable = measured
        assert canary == Measurement(420, pytest.approx(0.03), 250.0)
        assert stable == Measurement(None, None, None)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(StoreError, match="bad_data"):
        parse_query_result({"status": "error", "error": "bad_data"})
    with pytest.raises(StoreError, match="matrix"):
        parse_query_result({"status": "success", "data": {"resultType": "matrix", "result": []}})
    with pytest.raises(StoreError):
        PrometheusSource(PrometheusQueries("http://127.0.0.1:1", "x"), timeout=1).query("x")


# ---------------------------------------------------------------------------------------------- controller


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Scripted:
    """A metrics source that answers whatever the test says."""

    def __init__(self) -> None:
        self.canary = Measurement(100, 0.0, 10.0)
        self.calls = 0

    def measure(self, service: str, upstreams: tuple[str, str], window: dict[str, Any] | None,
                spec: Analysis) -> tuple[tuple[Measurement, Measurement] | None, dict[str, Any]]:
        self.calls += 1
        return (self.canary, Measurement(100, 0.0, 10.0)), {}


def crash_on_write(store: FileStore, nth: int) -> None:
    """Make the store's `nth` record write (and every later one) fail as if the controller died there."""
    real, calls = store.write_record, [0]

    def write(*args: Any) -> int:
        calls[0] += 1
        if calls[0] >= nth:
            raise RecordConflict("killed")
        return real(*args)
    store.write_record = write  # type: ignore[method-assign]


def setup(tmp_path: Path, spec: dict[str, Any],
          content: bytes | None = None) -> tuple[FileStore, Clock, Scripted, Controller]:
    """A store holding `content` (default: a document with `spec` as its rollout), the rollout started."""
    store = FileStore(str(tmp_path / "store"))
    store.publish(content or doc(spec), 0, "test", "")
    clock, source = Clock(), Scripted()
    ctl = Controller(store, interval=1, clock=clock, sources=lambda _: source)
    assert ctl.lead()
    rollout.start(store, "product", clock)
    return store, clock, source, ctl


def test_controller_steps_pauses_and_times_out_by_the_clock(tmp_path: Path) -> None:
    spec = {"canary": "canary", "steps": [{"weight": 10}, {"pause": "1m"}, {"weight": 50}, {"pause": "manual"}],
            "analysis": {"interval": "10s", "maxErrorRate": 0.05}, "maxDuration": "1h", "onFailure": "zero"}
    store, clock, _source, ctl = setup(tmp_path, spec)
    ctl.tick()
    assert canary_weight(store.current().content, "c", "product", "canary") == 1000
    ctl.tick()
    assert store.read_record("product")[0]["step"] == 1  # the 1 m pause holds without time passing
    clock.now += 61
    ctl.tick()
    ctl.tick()
    rec = store.read_record("product")[0]
    assert rec["step"] == 3 and rec["weight"] == 5000 and [a["result"] for a in rec["analyses"]] == ["ok", "ok"]
    clock.now += 3600
    ctl.tick()
    rec = store.read_record("product")[0]
    assert rec["phase"] == "rolled-back" and rec["reason"] == "maxDuration 3600s exceeded"
    assert canary_weight(store.current().content, "c", "product", "canary") == 0
    ctl.tick()  # terminal: nothing more happens
    assert len(store.history()) == 4
    with pytest.raises(UsageError, match="already ended"):
        rollout.request(store, "product", "promote")
    rollout.start(store, "product", clock)  # a finished rollout can be started again


def test_controller_failure_limit_and_a_crash_between_publish_and_record(tmp_path: Path) -> None:
    spec = {"canary": "canary", "steps": [{"weight": 10}, {"pause": "manual"}, {"weight": 100}],
            "analysis": {"interval": "10s", "maxErrorRate": 0.05}, "failureLimit": 1}
    store, clock, source, ctl = setup(tmp_path, spec)
    # Crash after publishing step 1 but before saving the record: the next tick must not publish it again.
    crash_on_write(store, 2)
    ctl.tick()
    del store.write_record
    assert len(store.history()) == 2 and store.read_record("product")[0]["step"] == 0
    ctl.tick()
    assert len(store.history()) == 2 and store.read_record("product")[0]["step"] == 1
    source.canary = Measurement(100, 0.2, 10.0)
    clock.now += 10
    ctl.tick()
    assert store.read_record("product")[0]["failures"] == 1 and store.read_record("product")[0]["phase"] != "rolled-back"
    clock.now += 5
    ctl.tick()
    assert source.calls == 1  # not again before the interval
    clock.now += 5
    ctl.tick()
    rec = store.read_record("product")[0]
    assert rec["phase"] == "rolled-back" and store.current().content == store.get(1).content
    assert store.current().meta.message == ("rollout product: rolled back (analysis failed 2 times (failureLimit 1)): "
                                            "revert to version 1")


def test_start_refuses_what_it_cannot_roll(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path / "store"))
    with pytest.raises(UsageError, match="nothing has been published"):
        rollout.start(store, "product")
    store.publish(dump(document(service())), 0, "t", "")
    with pytest.raises(UsageError, match="has no rollout section"):
        rollout.start(store, "product")
    with pytest.raises(UsageError, match="no service 'other'"):
        rollout.start(store, "other")
    with pytest.raises(rollout.NoRollout, match="no rollout of 'product'"):
        rollout.request(store, "product", "pause")
    store.publish(doc({"canary": "canary", "steps": [{"weight": 1}]}), 1, "t", "")
    rollout.start(store, "product")
    with pytest.raises(UsageError, match="already progressing"):
        rollout.start(store, "product")


def test_directory_store_records_and_lock(tmp_path: Path) -> None:
    a, b = FileStore(str(tmp_path / "s")), FileStore(str(tmp_path / "s"))
    assert a.read_record("x") == (None, 0)
    assert a.write_record("x", {"n": 1}, 0) == 1
    with pytest.raises(RecordConflict):
        b.write_record("x", {"n": 2}, 0)
    assert b.read_record("x") == ({"n": 1}, 1) and a.record_names() == ["x"]
    lead = a.acquire_leadership("a")
    assert lead is not None and lead.held()
    assert b.acquire_leadership("b") is None
    lead.release()
    assert not lead.held()
    again = b.acquire_leadership("b")
    assert again is not None
    again.release()


def test_promote_passes_the_next_gate_and_pause_holds_even_timed_steps(tmp_path: Path) -> None:
    spec = {"canary": "canary", "steps": [{"weight": 10}, {"pause": "1h"}, {"weight": 50}, {"pause": "1m"},
                                          {"weight": 100}]}
    store, clock, _source, ctl = setup(tmp_path, spec)
    rollout.request(store, "product", "promote")  # arrives before the weight step: kept for the gate after it
    ctl.tick()
    ctl.tick()
    rec = store.read_record("product")[0]
    assert rec["step"] == 2 and "promoted" in rec["events"][-1]["message"]
    ctl.tick()
    rollout.request(store, "product", "pause")
    clock.now += 120
    ctl.tick()
    rec = store.read_record("product")[0]
    assert rec["phase"] == "paused" and rec["step"] == 3
    rollout.request(store, "product", "resume")
    ctl.tick()
    assert store.read_record("product")[0]["step"] == 3  # the timed pause starts over after a manual one
    clock.now += 60
    ctl.tick()
    ctl.tick()
    rec = store.read_record("product")[0]
    assert rec["phase"] == "succeeded" and rec["weight"] == 10000
    assert "canary canary at 100%" in format_rollout_status(RolloutRecord.from_json(rec), clock.now)


# ---------------------------------------------------------------------------------------------- review fixes

RAMP = {"canary": "canary", "steps": [{"weight": 10}, {"pause": "1m"}, {"weight": 50}, {"pause": "manual"}],
        "analysis": {"interval": "10s", "maxErrorRate": 0.05}}


def live_weight(store: FileStore) -> int:
    current = store.current()
    assert current is not None
    return canary_weight(current.content, "c", "product", "canary")


class Lead:
    def __init__(self) -> None:
        self.ok = True

    def held(self) -> bool:
        return self.ok

    def release(self) -> None:
        self.ok = False


class Hooked(Scripted):
    """Runs `hook` once inside the next measurement: something happens while a slow query is in flight."""

    hook: Any = None

    def measure(self, *args: Any) -> Any:
        if self.hook is not None:
            hook, self.hook = self.hook, None
            hook()
        return super().measure(*args)


def hooked_setup(tmp_path: Path, spec: dict[str, Any]) -> tuple[FileStore, Clock, Hooked, Controller, Lead]:
    store = FileStore(str(tmp_path / "store"))
    store.publish(doc(spec), 0, "test", "")
    clock, source, lead = Clock(), Hooked(), Lead()
    ctl = Controller(store, interval=1, clock=clock, sources=lambda _: source)
    ctl.leader.leadership = lead
    rollout.start(store, "product", clock)
    ctl.tick()
    clock.now += 61
    ctl.tick()  # the 1 m pause is over: the next tick publishes 50 %
    clock.now += 11
    return store, clock, source, ctl, lead


def test_a_deposed_controller_never_publishes_over_the_new_leaders_rollback(tmp_path: Path) -> None:
    store, clock, source, a, _lead = hooked_setup(tmp_path, {**RAMP, "onFailure": "revert"})
    b = Controller(store, interval=1, clock=clock, sources=lambda _: Scripted())

    def new_leader_aborts() -> None:  # A still believes it leads; B took over and rolls back
        rollout.request(store, "product", "abort", clock)
        rec, revision = store.read_record("product")
        b.step("product", RolloutRecord.from_json(rec), revision)
    source.hook = new_leader_aborts
    a.tick()
    rec = store.read_record("product")[0]
    assert rec["phase"] == "aborted" and rec["weight"] == 0 and live_weight(store) == 0
    assert [m.message for m in store.history()][-1].startswith("rollout product: rolled back (abort requested)")
    assert len(store.history()) == 3


def test_leadership_lost_during_a_tick_stops_before_any_write(tmp_path: Path) -> None:
    store, _clock, source, ctl, lead = hooked_setup(tmp_path, RAMP)
    _, revision = store.read_record("product")
    source.hook = lambda: setattr(lead, "ok", False)
    ctl.tick()
    assert len(store.history()) == 2 and live_weight(store) == 1000
    assert store.read_record("product")[1] == revision  # no record write either


def test_a_publish_conflict_abandons_the_tick_instead_of_reapplying(tmp_path: Path) -> None:
    store, clock, source, ctl, _lead = hooked_setup(tmp_path, RAMP)

    def person_publishes() -> None:
        current = store.current()
        assert current is not None
        store.publish(set_canary_weight(current.content, "c", "product", "canary", "stable", 200),
                      current.version, "person", "by hand")
    source.hook = person_publishes
    ctl.tick()
    assert store.current().meta.author == "person" and live_weight(store) == 200  # type: ignore[union-attr]
    assert store.read_record("product")[0]["step"] == 2  # the step is not recorded as done
    clock.now += 1
    ctl.tick()  # the next tick decides again from fresh state
    assert live_weight(store) == 5000 and store.read_record("product")[0]["step"] == 3


def test_publish_conflicts_record_nothing_as_done(tmp_path: Path) -> None:
    store, _clock, _source, ctl = setup(tmp_path, RAMP)
    store.publish = lambda *a: (_ for _ in ()).throw(Conflict(1, 2))  # type: ignore[method-assign]
    for _ in range(3):
        ctl.tick()
    rec = store.read_record("product")[0]
    assert rec["step"] == 0 and rec["weight"] == 0 and rec["versions"] == []
    del store.publish
    ctl.tick()
    assert store.read_record("product")[0]["step"] == 1 and live_weight(store) == 1000


@pytest.mark.parametrize("crash", ["before-publish", "after-publish"])
def test_a_recorded_rollback_survives_a_crash_and_the_canary_never_ramps_again(tmp_path: Path, crash: str) -> None:
    store, clock, source, a = setup(tmp_path, {**RAMP, "failureLimit": 0, "onFailure": "revert"})
    a.tick()
    clock.now += 30
    source.canary = Measurement(100, 0.5, 10.0)  # broken
    # The rolling-back record write succeeds, then the controller dies before or after publishing the rollback.
    if crash == "before-publish":
        store.publish = lambda *a: (_ for _ in ()).throw(RuntimeError("killed"))  # type: ignore[method-assign]
    else:
        crash_on_write(store, 2)
    a.tick()
    vars(store).pop("publish", None)
    vars(store).pop("write_record", None)
    assert store.read_record("product")[0]["phase"] == "rolling-back"
    source.canary = Measurement(None, None, None)  # a restarted controller sees no data
    b = Controller(store, interval=1, clock=clock, sources=lambda _: source)
    for _ in range(3):
        clock.now += 31
        b.tick()
    rec = store.read_record("product")[0]
    assert rec["phase"] == "rolled-back" and live_weight(store) == 0 and rec["reason"].startswith("analysis failed")
    assert [m.message.split(":")[1] for m in store.history()[1:]] == [" step 1/4 weight 10%", " rolled back (analysis "
                                                                                            "failed 1 times (failureLimit 0))"]


def test_a_cli_request_racing_the_rollback_does_not_lose_it(tmp_path: Path) -> None:
    store, clock, source, ctl = setup(tmp_path, {**RAMP, "failureLimit": 0, "onFailure": "zero"})
    ctl.tick()
    clock.now += 30
    source.canary = Measurement(100, 0.5, 10.0)
    real_publish = store.publish

    def publish_then_cli(*args: Any) -> Any:
        meta = real_publish(*args)
        rollout.request(store, "product", "pause", clock)  # lands between the publish and the final write
        return meta
    store.publish = publish_then_cli  # type: ignore[method-assign]
    ctl.tick()
    del store.publish
    assert store.read_record("product")[0]["phase"] == "rolling-back"
    source.canary = Measurement(100, 0.0, 10.0)
    ctl.tick()
    rec = store.read_record("product")[0]
    assert rec["phase"] == "rolled-back" and live_weight(store) == 0 and len(store.history()) == 3


def test_analyses_stay_bounded_while_the_source_fails(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path / "store"))
    store.publish(doc(RAMP), 0, "t", "")

    class Down:
        def measure(self, *args: Any) -> Any:
            raise StoreError("prometheus: connection refused")
    clock = Clock()
    ctl = Controller(store, interval=1, clock=clock, sources=lambda _: Down())
    rollout.start(store, "product", clock)
    for _ in range(60):
        ctl.tick()
        clock.now += 10
    assert len(store.read_record("product")[0]["analyses"]) == KEEP_ANALYSES


def test_one_broken_record_does_not_stop_the_other_rollouts(tmp_path: Path) -> None:
    store, _clock, _source, ctl = setup(tmp_path, RAMP)
    (tmp_path / "store" / "rollouts" / "aaa.json").write_text('{"revision": 1}')
    ctl.tick()
    assert live_weight(store) == 1000


def test_an_unusable_revert_target_falls_back_to_zero(tmp_path: Path) -> None:
    store, clock, _source, ctl = setup(tmp_path, {**RAMP, "onFailure": "revert"})
    ctl.tick()
    rec, revision = store.read_record("product")
    rec["base_version"] = 99  # gone
    store.write_record("product", rec, revision)
    rollout.request(store, "product", "abort", clock)
    ctl.tick()
    rec = store.read_record("product")[0]
    assert rec["phase"] == "aborted" and live_weight(store) == 0 and rec["weight"] == 0
    assert "cannot revert to version 99" in rec["reason"] and "canary weight to 0 instead" in rec["reason"]


def test_revert_sets_the_weight_to_the_base_versions(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path / "store"))
    store.publish(doc({**RAMP, "onFailure": "revert"}, {"weights": {"stable": 97, "canary": 3}}), 0, "t", "")
    clock = Clock()
    ctl = Controller(store, interval=1, clock=clock, sources=lambda _: Scripted())
    rollout.start(store, "product", clock)
    ctl.tick()
    assert live_weight(store) == 1000
    rollout.request(store, "product", "abort", clock)
    ctl.tick()
    rec = store.read_record("product")[0]
    assert rec["phase"] == "aborted" and rec["weight"] == 300 == live_weight(store)


def test_start_leaves_the_clock_to_the_controller_and_a_clock_that_goes_back_is_harmless(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path / "store"))
    store.publish(doc({**RAMP, "maxDuration": "1h"}), 0, "t", "")
    rollout.start(store, "product", lambda: 5.0)  # a CLI host whose clock is far off
    rec = store.read_record("product")[0]
    assert rec["started_at"] is None and "not started" in format_rollout_status(RolloutRecord.from_json(rec), 10.0)
    clock, source = Clock(), Scripted()
    ctl = Controller(store, interval=1, clock=clock, sources=lambda _: source)
    ctl.tick()
    rec = store.read_record("product")[0]
    assert rec["started_at"] == clock.now and rec["phase"] == "progressing" and rec["step"] == 1
    clock.now -= 3600  # the controller's clock steps back an hour
    ctl.tick()
    rec = store.read_record("product")[0]
    assert rec["phase"] == "progressing" and source.calls == 1  # the analysis was due, not skipped for an hour
    assert "running 0s" in format_rollout_status(RolloutRecord.from_json(rec), clock.now)
    clock.now += 60
    ctl.tick()
    assert store.read_record("product")[0]["step"] == 2  # the pause restarted at the jump, it did not hang


def test_fleet_source_takes_a_host_missing_from_the_baseline_from_its_current_counters() -> None:
    fleet, spec = FakeFleet(), Analysis(30, min_requests=100, max_error_rate=0.01)
    source = FleetSource(fleet)
    fleet.entries = [{"host": "gw1", "traffic": traffic("a", (1000, 0))}, {"host": "gw3", "traffic": traffic("c", (5, 0))}]
    _, window = source.measure("product", ("canary", "stable"), None, spec)
    # gw2's entry was missing from the baseline (a late report); it carries 50 old 5xx from hours ago.
    # gw3 was missing from the next sample, then came back restarted.
    fleet.entries = [{"host": "gw1", "traffic": traffic("a", (1300, 0))}, {"host": "gw2", "traffic": traffic("b", (5300, 50))}]
    measured, window = source.measure("product", ("canary", "stable"), window, spec)
    assert measured is not None and measured[0].requests == 300 and measured[0].error_rate == 0
    fleet.entries = [{"host": "gw1", "traffic": traffic("a", (1400, 0))}, {"host": "gw2", "traffic": traffic("b", (5400, 50))},
                     {"host": "gw3", "traffic": traffic("c2", (7, 7))}]
    measured, _ = source.measure("product", ("canary", "stable"), window, spec)
    assert measured is not None and measured[0].requests == 100 + 100 + 7 and measured[0].error_rate == pytest.approx(7 / 207)


def test_prometheus_errors_do_not_show_the_urls_password() -> None:
    with pytest.raises(StoreError) as info:
        PrometheusSource(PrometheusQueries("http://bob:s3cret@127.0.0.1:1/", "x"), timeout=1).query("x")
    assert "s3cret" not in str(info.value) and "bob" not in str(info.value) and "***@127.0.0.1:1" in str(info.value)


def test_etcd_leadership_counts_its_term_from_before_the_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from grayagent.stores import etcd

    monkeypatch.setattr(etcd, "LEADER_LEASE_TTL", 0.5)
    sent: list[float] = []

    class SlowEtcd:
        def _keepalive_once(self, lease: int) -> bool:
            sent.append(time.monotonic())
            time.sleep(0.05)  # the answer is slow: etcd renewed the lease when the request arrived
            return True

        def _revoke(self, lease: int) -> None:
            pass
    lead = etcd._LeaseLeadership(SlowEtcd(), 1, time.monotonic())  # type: ignore[arg-type]
    try:
        deadline = time.monotonic() + 2
        while len(sent) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(sent) >= 2 and lead._last_ok <= sent[-1]
    finally:
        lead.release()


def test_completing_a_rollback_from_a_stale_record_publishes_nothing(tmp_path: Path) -> None:
    store, clock, source, a = setup(tmp_path, {**RAMP, "failureLimit": 0, "onFailure": "zero"})
    a.tick()
    clock.now += 30
    source.canary = Measurement(100, 0.5, 10.0)
    store.publish = lambda *a: (_ for _ in ()).throw(RuntimeError("killed"))  # type: ignore[method-assign]
    a.tick()  # rolling-back is recorded, then the controller dies before publishing
    del store.publish
    stale, revision = store.read_record("product")
    assert stale["phase"] == "rolling-back"
    rollout.request(store, "product", "pause", clock)  # the record moves on after the stale read
    with pytest.raises(RecordConflict):
        a.step("product", RolloutRecord.from_json(stale), revision)
    assert len(store.history()) == 2 and live_weight(store) == 1000
    a.tick()  # from the fresh record it completes
    assert store.read_record("product")[0]["phase"] == "rolled-back" and live_weight(store) == 0


def test_a_rollback_whose_target_vanished_falls_back_to_zero(tmp_path: Path) -> None:
    store, clock, _source, ctl = setup(tmp_path, {**RAMP, "onFailure": "revert"})
    ctl.tick()
    store.publish = lambda *a: (_ for _ in ()).throw(RuntimeError("killed"))  # type: ignore[method-assign]
    rollout.request(store, "product", "abort", clock)
    ctl.tick()
    del store.publish
    rec, revision = store.read_record("product")
    rec["rollback"]["version"] = 99
    store.write_record("product", rec, revision)
    ctl.tick()
    rec = store.read_record("product")[0]
    assert rec["phase"] == "aborted" and live_weight(store) == 0 and "cannot revert to version 99" in rec["reason"]


OLD_RECORD = {  # as the dict-based controller wrote it, mid-rollback
    "service": "product", "phase": "rolling-back", "step": 2, "steps": ["weight 10%", "pause 60s", "weight 50%"],
    "canary": "canary", "stable": "stable", "started_at": 1000.0, "step_started_at": 1061.0, "base_version": 1,
    "weight": 1000, "failures": 2, "failure_limit": 1, "max_duration": 3600.0, "on_failure": "revert",
    "analyses": [{"time": 1070.0, "step": 2, "weight": 1000, "result": "fail", "reasons": ["canary 5xx"],
                  "canary": {"requests": 100, "error_rate": 0.2, "p99_ms": 10.0}, "stable": {}}],
    "versions": [2], "window": {"sample": {}, "boots": {}}, "last_analysis_at": 1070.0,
    "requests": {"pause": False}, "events": [{"time": 1000.0, "message": "started"}],
    "reason": "analysis failed 2 times (failureLimit 1)",
    "rollback": {"phase": "rolled-back", "canary": "canary", "stable": "stable", "version": 1, "on_failure": "revert"},
    "note": "a key from a newer controller",
}


def test_records_already_in_a_store_read_and_write_back_unchanged(tmp_path: Path) -> None:
    rec = RolloutRecord.from_json(json.loads(json.dumps(OLD_RECORD)))
    assert rec.phase == "rolling-back" and rec.rollback is not None and rec.rollback.version == 1
    assert rec.to_json() == OLD_RECORD
    sparse = RolloutRecord.from_json({"service": "product", "phase": "progressing"})
    assert sparse.step == 0 and sparse.started_at is None and sparse.requests == {} and sparse.rollback is None
    # The controller completes an old record's rollback as the old controller would have.
    store = FileStore(str(tmp_path / "store"))
    store.publish(doc(RAMP), 0, "t", "")
    current = store.current()
    assert current is not None
    store.publish(set_canary_weight(current.content, "c", "product", "canary", "stable", 1000), 1, "t", "")
    store.write_record("product", OLD_RECORD, 0)
    Controller(store, interval=1, clock=Clock(), sources=lambda _: Scripted()).tick()
    done = store.read_record("product")[0]
    assert done["phase"] == "rolled-back" and live_weight(store) == 0 and done["note"] == OLD_RECORD["note"]
    assert store.current().meta.message.endswith("revert to version 1")  # type: ignore[union-attr]
