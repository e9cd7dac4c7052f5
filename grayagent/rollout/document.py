"""The documents a rollout publishes: one service's split weights and audience rules; nothing else changes.

`stage_document` is the one place that builds what a routing step (a weight, an audience, or both) publishes;
the controller's step publish and `grayagent rollout plan --stage K` both call it. A stage is the canary's weight
(that of the latest weight step so far; before any, the document's own) and the rules `audience-NAME` -> canary
of every audience added so far, appended after the service's own rules in the order they were added.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from grayagent.errors import UsageError
from grayagent.rules.docload import dump_like
from grayagent.rules.model import Rollout, Service, load_data, parse_document, parse_weight
from grayagent.rules.modeldata import audience_rule_name


@dataclass(frozen=True, slots=True)
class Stage:
    """What a routing step leaves in place: the canary's weight and the audiences sent to it, in order."""

    weight: int                    # hundredths of a percent
    audiences: tuple[str, ...] = ()


def percent(hundredths: int) -> int | float:
    """Hundredths of a percent as a document writes the percentage: 10, 12.5."""
    return hundredths // 100 if hundredths % 100 == 0 else float(Decimal(hundredths) / 100)


def routing_steps(spec: Rollout) -> list[int]:
    """The indexes (into spec.steps) of the routing steps; stage K is routing_steps(spec)[K - 1]."""
    return [i for i, step in enumerate(spec.steps) if step.routing]


def stage_number(spec: Rollout, index: int) -> int:
    """How many routing steps steps[0..index] hold: the stage in place once steps[index] has run (0: none yet)."""
    return sum(1 for step in spec.steps[: index + 1] if step.routing)


def planned_stage(spec: Rollout, stage: int, own_weight: int) -> Stage:
    """The stage after `stage` routing steps; `own_weight` is the canary's weight before any weight step."""
    weight, audiences = own_weight, []
    for index in routing_steps(spec)[:stage]:
        step = spec.steps[index]
        weight = step.weight if step.weight is not None else weight
        if step.audience is not None:
            audiences.append(step.audience)
    return Stage(weight, tuple(audiences))


def current_stage(svc: Service) -> Stage:
    """The stage a parsed service is at: its canary's weight and the audience rules it holds, in order."""
    spec = svc.rollout
    if spec is None or svc.split is None:
        return Stage(0)
    weight = dict(svc.split.weights).get(spec.canary, 0)
    names = {a.rule_name: a.name for a in spec.audiences}
    return Stage(weight, tuple(names[r.name] for r in svc.rules if r.name in names and r.to == spec.canary))


def stage_of(content: bytes, source: str, service: str) -> Stage:
    """The stage a document's service is at (KeyError when the service is not in it)."""
    return current_stage(parse_document(content, source).service(service))


def _service_data(data: Any, source: str, service: str) -> dict[str, Any]:
    matches = [s for s in data["spec"]["services"] if s.get("name") == service]
    if not matches:
        raise UsageError(f"{source}: no service {service!r}")
    found: dict[str, Any] = matches[0]
    return found


def _set_weight(svc: dict[str, Any], source: str, canary: str, stable: str, hundredths: int) -> None:
    weights: dict[str, Any] = svc["split"]["weights"]
    others = sum(parse_weight(v) or 0 for k, v in weights.items() if k not in (canary, stable))
    if hundredths + others > 10000:
        raise UsageError(f"{source}: {svc['name']}: canary weight {percent(hundredths)} leaves no room for the others")
    # In place: a dict keeps its keys' order, and the split's order decides who is where (routing.split_parts).
    weights[stable] = percent(10000 - others - hundredths)
    weights[canary] = percent(hundredths)


def _set_audiences(svc: dict[str, Any], canary: str, audiences: tuple[str, ...]) -> None:
    """The service's own rules, then one rule per audience in `audiences` (declared under rollout.audiences)."""
    declared: dict[str, Any] = svc.get("rollout", {}).get("audiences", {})
    generated = {audience_rule_name(name) for name in declared}
    own = [r for r in svc.get("rules", []) if r.get("name") not in generated]
    added = [{"name": audience_rule_name(name), "match": copy.deepcopy(declared[name]), "to": canary}
             for name in audiences]
    if "rules" in svc:
        svc["rules"] = own + added
    elif added:  # a new key goes where people write it, after `default`, so stage documents diff well
        items = list(svc.items())
        at = next((i + 1 for i, (k, _) in enumerate(items) if k == "default"), len(items))
        svc.clear()
        svc.update([*items[:at], ("rules", added), *items[at:]])


def _dump(data: Any, content: bytes, source: str) -> bytes:
    """YAML comes back as YAML (comments are not kept), JSON as JSON; the result is validated."""
    out = dump_like(data, content)
    parse_document(out, source)
    return out


def _rewrite(content: bytes, source: str, service: str, canary: str, stable: str, stage: Stage) -> bytes:
    """The document with `service` at `stage`: `canary` at stage.weight, `stable` taking the rest (other upstreams
    keep theirs), and exactly stage.audiences' rules after the service's own rules."""
    data: Any = load_data(content, source)
    raw = _service_data(data, source, service)
    _set_weight(raw, source, canary, stable, stage.weight)
    _set_audiences(raw, canary, stage.audiences)
    return _dump(data, content, source)


def stage_document(content: bytes, source: str, service: str, stage: int) -> bytes:
    """The complete document the `stage`-th routing step (1-based; pauses are not counted) publishes.

    `content` is the document the step applies to (the rollout's starting document, or the current version):
    before any weight step the canary keeps its weight in it. Audience rules already in it are replaced, so
    applying a stage twice, or to a version that holds an earlier stage, gives the same rules.
    """
    svc = _rollout_service(content, source, service)
    spec = svc.rollout
    assert spec is not None
    count = len(routing_steps(spec))
    if not 1 <= stage <= count:
        raise UsageError(f"{source}: {service}: stage {stage} is out of range: the rollout has {count} routing steps")
    own = current_stage(svc).weight
    return _rewrite(content, source, service, spec.canary, spec.stable, planned_stage(spec, stage, own))


def rollback_document(content: bytes, source: str, service: str, canary: str, stable: str) -> bytes | None:
    """`onFailure: zero`: `canary` at weight 0 and no audience rules; None when `content` already is so.

    KeyError when the service is not in `content`.
    """
    svc = parse_document(content, source).service(service)
    weight = dict(svc.split.weights).get(canary, 0) if svc.split is not None else 0
    if weight == 0 and not current_stage(svc).audiences:
        return None
    return _rewrite(content, source, service, canary, stable, Stage(0))


def without_audiences(content: bytes, source: str, service: str) -> bytes:
    """`content` without the service's audience rules (a revert target from an earlier rollout may hold some);
    the very same bytes when it holds none."""
    try:
        svc = _rollout_service(content, source, service)
    except UsageError:
        return content  # no rollout there: no audience rules to know of
    spec, stage = svc.rollout, current_stage(svc)
    if spec is None or not stage.audiences:
        return content
    return _rewrite(content, source, service, spec.canary, spec.stable, Stage(stage.weight))


def _rollout_service(content: bytes, source: str, service: str) -> Service:
    try:
        svc = parse_document(content, source).service(service)
    except KeyError:
        raise UsageError(f"{source}: no service {service!r}") from None
    if svc.rollout is None:
        raise UsageError(f"{source}: service {service!r} has no rollout section")
    return svc


def set_canary_weight(content: bytes, source: str, service: str, canary: str, stable: str, hundredths: int) -> bytes:
    """The document with `canary` at `hundredths` and `stable` taking the rest (other upstreams keep theirs).

    The result is validated. YAML comes back as YAML (comments are not kept), JSON as JSON.
    """
    data: Any = load_data(content, source)
    _set_weight(_service_data(data, source, service), source, canary, stable, hundredths)
    return _dump(data, content, source)


def canary_weight(content: bytes, source: str, service: str, canary: str) -> int:
    """The canary's current split weight in hundredths (0 when the split does not name it)."""
    svc = parse_document(content, source).service(service)
    if svc.split is None:
        return 0
    return dict(svc.split.weights).get(canary, 0)
