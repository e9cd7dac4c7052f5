"""Rollout audiences: validation, the stage documents (grayagent/rollout/document.py), the controller publishing
them (and taking them back on rollback), and `grayagent rollout plan` on examples/case-study.yaml."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import fastjsonschema
import jsonschema
import pytest
import yaml

from grayagent.cli_rollout import format_rollout_status
from grayagent.errors import InvalidDocument, UsageError
from grayagent.rollout import usecases as rollout
from grayagent.rollout.controller import Controller
from grayagent.rollout.document import (
    Stage,
    rollback_document,
    stage_document,
    stage_of,
    without_audiences,
)
from grayagent.rollout.record import RolloutRecord
from grayagent.rules.model import parse_document, schema
from grayagent.rules.routing import Request, route
from grayagent.stores.file import FileStore
from tests.conftest import EXAMPLES
from tests.docs import document, dump, service
from tests.test_rollout_units import Clock, Scripted, crash_on_write
from tests.test_rollout_units import setup as units_setup

AUDIENCES = {"employees": {"headers": {"X-Employee": {"exact": "1"}}}, "vip": {"cookies": {"tier": {"exact": "vip"}}}}
SPLIT = {"key": {"header": "X-User-Id"}, "weights": {"stable": 100, "canary": 0}}
STEPS = [{"audience": "employees"}, {"pause": "1m"}, {"audience": "vip", "weight": 5}, {"pause": "1m"},
         {"weight": 50}]
FORCE_STABLE = {"name": "force-stable", "match": {"headers": {"X-Force": {"exact": "stable"}}}, "to": "stable"}


def spec(**extra: Any) -> dict[str, Any]:
    return {"canary": "canary", "audiences": AUDIENCES, "steps": STEPS, **extra}


def doc(ro: dict[str, Any] | None = None, split: dict[str, Any] | None = None, **extra: Any) -> bytes:
    return dump(document(service(split=split or SPLIT, rollout=ro or spec(), **extra)))


def problems(content: bytes) -> list[str]:
    with pytest.raises(InvalidDocument) as info:
        parse_document(content, "d")
    return [str(p) for p in info.value.problems]


RO = "d: spec.services[0].rollout"

# ---------------------------------------------------------------------------------------------- validation


def test_audiences_and_audience_steps_parse() -> None:
    data = json.loads(doc())
    fastjsonschema.compile(schema())(data)
    jsonschema.Draft7Validator(schema()).validate(data)
    ro = parse_document(doc(), "d").services[0].rollout
    assert ro is not None
    assert [a.name for a in ro.audiences] == ["employees", "vip"]
    assert [a.rule_name for a in ro.audiences] == ["audience-employees", "audience-vip"]
    assert [s.describe() for s in ro.steps] == ["audience employees", "pause 60s", "audience vip, weight 5%",
                                                "pause 60s", "weight 50%"]
    assert [s.routing for s in ro.steps] == [True, False, True, False, True]


def test_audience_problems_name_the_file_and_field() -> None:
    assert problems(doc(spec(steps=[{"audience": "staff"}]))) == [
        f"{RO}.steps[0].audience: unknown audience 'staff'; declare it under rollout.audiences (known: employees, vip)"]
    assert problems(doc(spec(steps=[{"audience": "vip"}, {"pause": "1s"}, {"audience": "vip", "weight": 5}]))) == [
        f"{RO}.steps[2].audience: audience 'vip' is already added by steps[0]; audiences accumulate"]
    assert problems(doc(spec(steps=[{"audience": "vip", "pause": "1s"}]))) == [
        f"{RO}.steps[0]: a pause stands alone; got audience, pause"]
    assert problems(doc(spec(audiences={"a" * 55: AUDIENCES["vip"]}, steps=[{"weight": 5}])))[0].startswith(
        f"{RO}.audiences: '{'a' * 55}' does not match")
    parse_document(doc(spec(audiences={"a" * 54: AUDIENCES["vip"]}, steps=[{"audience": "a" * 54}])), "d")
    # The match is checked as a rule's match is, and named under the audience.
    assert problems(doc(spec(audiences={"net": {"sourceCIDRs": ["10.0.0.1/8"], "headers": {"X-Envoy-X": {
        "exact": "1"}}}}, steps=[{"audience": "net"}]))) == [
        f"{RO}.audiences.net.sourceCIDRs[0]: 10.0.0.1/8 has host bits set",
        f"{RO}.audiences.net.headers.X-Envoy-X: cannot match on it: Envoy removes x-envoy-* headers from external "
        "requests, so nginx and Envoy would route differently"]


def test_an_operator_rule_may_not_take_an_audience_rule_name() -> None:
    clash = f"{RO}.audiences.vip: its rule name 'audience-vip' is taken by rules[0], which is not the rule the " \
            "rollout adds (the same match, to 'canary', after the service's own rules); rename the audience or that rule"
    other = {"name": "audience-vip", "match": {"headers": {"X-Vip": {"exact": "1"}}}, "to": "canary"}
    assert problems(doc(rules=[other])) == [clash]
    assert problems(doc(rules=[{**other, "match": AUDIENCES["vip"], "to": "stable"}])) == [clash]
    generated = {"name": "audience-vip", "match": AUDIENCES["vip"], "to": "canary"}
    assert problems(doc(rules=[generated, FORCE_STABLE])) == [clash]  # ahead of an own rule: not the generated one
    parse_document(doc(rules=[FORCE_STABLE, generated]), "d")  # exactly what a stage document holds


def test_split_orders_that_cannot_ramp_monotonically_are_refused() -> None:
    three = {"stable": ["h:1"], "canary": ["h:2"], "beta": ["h:3"]}
    ramp = {"canary": "canary", "steps": [{"weight": 5}, {"weight": 20}]}
    for order in (("stable", "canary", "beta"), ("canary", "beta", "stable"), ("stable", "beta", "canary")):
        weights = dict(zip(order, ({"stable": 80, "canary": 0, "beta": 20}[n] for n in order), strict=True))
        assert problems(doc(ramp, {"weights": weights}, servers=three)) == [
            f"d: spec.services[0].split.weights: the rollout cannot ramp 'canary' in this order ({', '.join(order)}): "
            "users would move between upstreams as the weights change; list 'canary' right before 'stable', e.g. "
            "beta, canary, stable, or last right after it: beta, stable, canary"]
    for order in (("canary", "stable", "beta"), ("beta", "canary", "stable"), ("beta", "stable", "canary")):
        weights = {n: {"stable": 80, "canary": 0, "beta": 20}[n] for n in order}
        parse_document(doc(ramp, {"weights": weights}, servers=three), "d")
    # A 0 % upstream is no part of nginx's split: it does not separate the two.
    parse_document(doc(ramp, {"weights": {"beta": 20, "stable": 80, "gamma": 0, "canary": 0}},
                       servers={**three, "gamma": ["h:4"]}), "d")
    # Audience-only rollouts never change the split.
    parse_document(doc({"canary": "canary", "audiences": AUDIENCES, "steps": [{"audience": "vip"}]},
                       {"weights": {"stable": 80, "canary": 0, "beta": 20}}, servers=three), "d")


def test_a_falling_weight_is_refused() -> None:
    assert problems(doc({"canary": "canary", "steps": [{"weight": 30}, {"pause": "1s"}, {"weight": 10}]})) == [
        f"{RO}.steps[2].weight: 10% is below steps[0]'s 30%: a ramp only grows, so users on the canary stay there "
        "(to go back, abort the rollout)"]


# ---------------------------------------------------------------------------------------------- stage documents


def rules_of(content: bytes, name: str = "product") -> list[tuple[str, str]]:
    return [(r.name, r.to) for r in parse_document(content, "d").service(name).rules]


def test_stage_documents_accumulate_audiences_after_the_services_own_rules() -> None:
    other = service("search", listen=8081, rules=[FORCE_STABLE], split=SPLIT)
    content = dump(document(service(split=SPLIT, rollout=spec(), rules=[FORCE_STABLE]), other))
    one, two, three = (stage_document(content, "d", "product", k) for k in (1, 2, 3))
    assert rules_of(one) == [("force-stable", "stable"), ("audience-employees", "canary")]
    assert stage_of(one, "d", "product") == Stage(0, ("employees",))
    assert rules_of(two)[1:] == [("audience-employees", "canary"), ("audience-vip", "canary")]
    assert stage_of(two, "d", "product") == Stage(500, ("employees", "vip"))
    assert stage_of(three, "d", "product") == Stage(5000, ("employees", "vip"))
    # Applying a stage to a version that holds another one replaces its audience rules.
    assert stage_document(one, "d", "product", 3) == three
    assert stage_of(stage_document(three, "d", "product", 1), "d", "product") == Stage(5000, ("employees",))
    assert stage_document(two, "d", "product", 2) == two
    # Everything else is unchanged: the other service, and this one but for its weights and audience rules.
    before, after = json.loads(content), json.loads(three)
    assert before["spec"]["services"][1] == after["spec"]["services"][1]
    assert after["spec"]["services"][0]["split"]["weights"] == {"stable": 50, "canary": 50}
    after["spec"]["services"][0]["split"]["weights"] = SPLIT["weights"]
    after["spec"]["services"][0]["rules"] = [FORCE_STABLE]
    assert before == after
    # The operator's rule keeps precedence over an audience.
    svc = parse_document(three, "d").service("product")
    assert route(svc, Request.build({"X-Employee": "1", "X-Force": "stable"})).upstream == "stable"
    assert route(svc, Request.build({"X-Employee": "1"})).rule == "audience-employees"
    for bad in (0, 4):
        with pytest.raises(UsageError, match=f"stage {bad} is out of range: the rollout has 3 routing steps"):
            stage_document(content, "d", "product", bad)


def test_before_any_weight_step_the_canary_keeps_the_documents_weight() -> None:
    content = doc(split={"key": {"header": "X-User-Id"}, "weights": {"stable": 97, "canary": 3}})
    assert stage_of(stage_document(content, "d", "product", 1), "d", "product") == Stage(300, ("employees",))


def test_yaml_stays_yaml_and_a_new_rules_key_goes_after_default() -> None:
    content = yaml.safe_dump(json.loads(doc()), sort_keys=False).encode()
    out = stage_document(content, "d", "product", 1)
    assert not out.lstrip().startswith(b"{")
    keys = list(yaml.safe_load(out)["spec"]["services"][0])
    assert keys.index("rules") == keys.index("default") + 1


def test_rollback_documents_take_the_audience_rules_out() -> None:
    two = stage_document(doc(rules=[FORCE_STABLE]), "d", "product", 2)
    zero = rollback_document(two, "d", "product", "canary", "stable")
    assert zero is not None and stage_of(zero, "d", "product") == Stage(0)
    assert rules_of(zero) == [("force-stable", "stable")]
    assert rollback_document(zero, "d", "product", "canary", "stable") is None  # already there
    reverted = without_audiences(two, "d", "product")
    assert stage_of(reverted, "d", "product") == Stage(500) and rules_of(reverted) == [("force-stable", "stable")]
    plain = doc()
    assert without_audiences(plain, "d", "product") is plain


# ---------------------------------------------------------------------------------------------- controller


def setup(tmp_path: Path, ro: dict[str, Any]) -> tuple[FileStore, Clock, Scripted, Controller]:
    return units_setup(tmp_path, ro, doc(ro, rules=[FORCE_STABLE]))


def live(store: FileStore) -> Stage:
    current = store.current()
    assert current is not None
    return stage_of(current.content, "c", "product")


def test_controller_publishes_each_stage_and_judges_an_audience_at_weight_0(tmp_path: Path) -> None:
    store, clock, source, ctl = setup(tmp_path, spec(analysis={"interval": "10s", "maxErrorRate": 0.05}))
    ctl.tick()
    assert live(store) == Stage(0, ("employees",))
    current = store.current()
    assert current is not None and current.meta.message == "rollout product: step 1/5 audience employees"
    rec = store.read_record("product")[0]
    assert rec["audiences"] == ["employees"] and rec["weight"] == 0 and rec["step"] == 1
    clock.now += 10
    ctl.tick()
    assert source.calls == 1  # the employees are the canary's traffic: it is judged at weight 0
    clock.now += 60
    ctl.tick()
    ctl.tick()
    assert live(store) == Stage(500, ("employees", "vip"))
    assert rules_of(store.current().content)[0] == ("force-stable", "stable")  # type: ignore[union-attr]
    status = format_rollout_status(RolloutRecord.from_json(store.read_record("product")[0]), clock.now)
    assert "canary canary at 5% + audiences employees, vip" in status and "  ->  4. pause 1m" in status
    clock.now += 60
    ctl.tick()
    ctl.tick()
    rec = store.read_record("product")[0]
    assert rec["phase"] == "succeeded" and live(store) == Stage(5000, ("employees", "vip"))
    assert len(store.history()) == 4


def test_a_crash_between_publish_and_record_does_not_publish_a_stage_twice(tmp_path: Path) -> None:
    store, _clock, _source, ctl = setup(tmp_path, spec())
    crash_on_write(store, 2)
    ctl.tick()
    del store.write_record
    assert len(store.history()) == 2 and store.read_record("product")[0]["step"] == 0
    ctl.tick()  # the audience rule is already there: no second publish
    rec = store.read_record("product")[0]
    assert len(store.history()) == 2 and rec["step"] == 1 and rec["audiences"] == ["employees"]


def test_a_person_who_removed_an_audience_rule_gets_it_back_at_the_next_routing_step(tmp_path: Path) -> None:
    store, clock, _source, ctl = setup(tmp_path, spec())
    ctl.tick()
    store.publish(doc(rules=[FORCE_STABLE]), 2, "ops", "back to the source file")
    clock.now += 60
    ctl.tick()
    ctl.tick()
    assert live(store) == Stage(500, ("employees", "vip"))


@pytest.mark.parametrize("on_failure", ["zero", "revert"])
def test_rollback_removes_the_audience_rules(tmp_path: Path, on_failure: str) -> None:
    store, _clock, _source, ctl = setup(tmp_path, spec(onFailure=on_failure))
    ctl.tick()
    ctl.tick()
    assert live(store).audiences == ("employees",)
    rollout.request(store, "product", "abort")
    ctl.tick()
    rec = store.read_record("product")[0]
    assert rec["phase"] == "aborted" and live(store) == Stage(0) and "audiences" not in rec
    assert rules_of(store.current().content) == [("force-stable", "stable")]  # type: ignore[union-attr]


def test_revert_to_a_version_that_holds_an_earlier_rollouts_audiences_takes_them_out(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path / "store"))
    store.publish(stage_document(doc(spec(onFailure="revert")), "d", "product", 3), 0, "t", "earlier rollout")
    clock = Clock()
    ctl = Controller(store, interval=1, clock=clock, sources=lambda _: Scripted())
    assert ctl.lead()
    rollout.start(store, "product", clock)
    ctl.tick()
    rollout.request(store, "product", "abort")
    ctl.tick()
    assert live(store) == Stage(5000)


# ---------------------------------------------------------------------------------------------- plan

CASE_STUDY = str(EXAMPLES / "case-study.yaml")
TIMELINE = """\
rollout order: canary 'canary', stable 'stable'; the canary starts at 0%
step  stage  adds       canary  audiences       pause  checks
   1      1  employees      0%  employees       -      5xx rate <= 1%, p99 <= 300ms
   2      -  -              0%  employees       24h    5xx rate <= 1%, p99 <= 300ms
   3      2  vip            0%  employees, vip  -      5xx rate <= 1%, p99 <= 300ms
   4      -  -              0%  employees, vip  24h    5xx rate <= 1%, p99 <= 300ms
   5      3  -             10%  employees, vip  -      5xx rate <= 1%, p99 <= 300ms
   6      -  -             10%  employees, vip  24h    5xx rate <= 1%, p99 <= 300ms
   7      4  -             30%  employees, vip  -      5xx rate <= 1%, p99 <= 300ms
   8      -  -             30%  employees, vip  24h    5xx rate <= 1%, p99 <= 300ms
   9      5  -             50%  employees, vip  -      5xx rate <= 1%, p99 <= 300ms
  10      -  -             50%  employees, vip  24h    5xx rate <= 1%, p99 <= 300ms
  11      6  -            100%  employees, vip  -      - (then the rollout has succeeded)
"""


def grayagent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "grayagent", *args], capture_output=True, text=True, check=False)


def test_plan_prints_the_case_study_timeline() -> None:
    done = grayagent("rollout", "plan", CASE_STUDY, "order")
    assert done.returncode == 0, done.stderr
    assert done.stdout == TIMELINE
    data = json.loads(grayagent("rollout", "plan", CASE_STUDY, "order", "-o", "json").stdout)
    assert [(s["stage"], s["adds"], s["weight"], s["pause"]) for s in data["steps"][:5]] == [
        (1, ["employees"], 0, None), (None, [], 0, 86400.0), (2, ["vip"], 0, None), (None, [], 0, 86400.0),
        (3, [], 10, None)]


def user(i: int, employee: bool = False, vip: bool = False) -> Request:
    headers = {"X-User-Id": f"user-{i}"}
    if employee:
        headers["X-Employee"] = "1"
    return Request.build(headers, cookies={"tier": "vip"} if vip else None)


def test_each_stage_document_validates_and_routes_the_case_study_audiences(tmp_path: Path) -> None:
    users = range(3000)
    on_canary_before: set[int] = set()
    for k in range(1, 7):
        done = grayagent("rollout", "plan", CASE_STUDY, "order", "--stage", str(k))
        assert done.returncode == 0, done.stderr
        stage_file = tmp_path / f"stage-{k}.yaml"
        stage_file.write_text(done.stdout)
        assert grayagent("validate", str(stage_file)).returncode == 0
        svc = parse_document(done.stdout.encode(), str(stage_file)).service("order")
        assert all(route(svc, user(i, employee=True)).upstream == "canary" for i in users)
        assert all(route(svc, user(i, vip=True)).upstream == ("canary" if k >= 2 else "stable") for i in users)
        on_canary = {i for i in users if route(svc, user(i)).upstream == "canary"}
        share = {1: 0, 2: 0, 3: 0.10, 4: 0.30, 5: 0.50, 6: 1.0}[k]
        assert abs(len(on_canary) / len(users) - share) < 0.03
        assert on_canary_before <= on_canary
        on_canary_before = on_canary


def test_plan_errors_are_one_line_naming_the_flag_or_field(tmp_path: Path) -> None:
    for stage in ("0", "7"):
        done = grayagent("rollout", "plan", CASE_STUDY, "order", "--stage", stage)
        assert done.returncode == 2 and done.stderr == (
            f"grayagent: --stage: {stage} is out of range: the rollout of 'order' has 6 routing steps, so give 1 to 6 "
            "(pauses are not counted)\n")
    done = grayagent("rollout", "plan", CASE_STUDY, "payment")
    assert done.returncode == 2 and done.stderr == (
        f"grayagent: {CASE_STUDY}: spec.services: no service 'payment' (services: order)\n")
    plain = tmp_path / "plain.json"
    plain.write_bytes(dump(document(service())))
    done = grayagent("rollout", "plan", str(plain), "product")
    assert done.returncode == 2 and done.stderr == (
        f"grayagent: {plain}: spec.services[0].rollout: service 'product' has no rollout section\n")
    done = grayagent("rollout", "plan", str(tmp_path / "missing.yaml"), "order")
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "missing.yaml" in done.stderr
