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

from grayagent.errors import InvalidDocument, StoreError, UsageError
from grayagent.model import Analysis, PrometheusQueries, parse_document, parse_duration, schema
from grayagent.rollout import controller as rollout
from grayagent.rollout.analysis import Measurement, judge, measurement_from_counters, quantile
from grayagent.rollout.controller import Controller
from grayagent.rollout.document import canary_weight, set_canary_weight
from grayagent.rollout.sources import FleetSource, PrometheusSource, parse_query_result
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
                        {"weights": {"stable": 90, "canary": 0, "beta": 10}},
                        servers={"stable": ["h:1"], "canary": ["h:2"], "beta": ["h:3"]})) == [
        "d: spec.services[0].rollout.steps[0].weight: 5.555 has more than two decimals",
        "d: spec.services[0].rollout.steps[1].weight: 95% plus the other upstreams' 10% exceeds 100"]
    assert problems(doc({"canary": "canary", "steps": [{"weight": 5, "pause": "1s"}]})) == [
        "d: spec.services[0].rollout.steps[0]: give exactly one of weight, pause; got weight, pause"]
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
                b"weights: {stable: 90, beta: 10, canary: 0}}\n"
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
    assert window2 is window  # 40 < minRequests: the window keeps growing
    # Host b restarted (new boot, counters from zero); host c is new.
    fleet.entries = [{"host": "a", "traffic": traffic("b1", (150, 6))}, {"host": "b", "traffic": traffic("b3", (5, 5))},
                     {"host": "c", "traffic": traffic("b4", (5, 0))}, {"host": "d"}]
    measured, window3 = source.measure("product", ("canary", "stable"), window2, spec)
    assert measured is not None
    canary = measured[0]
    assert canary.requests == 50 + 5 + 5 and canary.error_rate == pytest.approx(10 / 60)
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


def setup(tmp_path: Path, spec: dict[str, Any]) -> tuple[FileStore, Clock, Scripted, Controller]:
    store = FileStore(str(tmp_path / "store"))
    store.publish(doc(spec), 0, "test", "")
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
    real_write = store.write_record
    store.write_record = lambda *a: (_ for _ in ()).throw(RecordConflict("crash"))  # type: ignore[method-assign]
    ctl.tick()
    store.write_record = real_write  # type: ignore[method-assign]
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
    with pytest.raises(UsageError, match="no rollout of 'product'"):
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
    assert "canary canary at 100%" in rollout.format_status(rec, clock.now)
