"""The use cases behind `grayagent rollout start|status|pause|resume|promote|abort|plan`.

They only read the current document and read or write rollout records (compare-and-set); the leading
controller acts on what they record at its next tick. `plan` reads a document file and needs no store.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from grayagent.errors import GrayagentError, UsageError
from grayagent.rollout import windows
from grayagent.rollout.document import (
    canary_weight,
    current_stage,
    percent,
    planned_stage,
    routing_steps,
    stage_document,
    stage_number,
)
from grayagent.rollout.record import RolloutRecord
from grayagent.rules.idlists import read_document
from grayagent.rules.model import Rollout, Service, parse_document
from grayagent.stores.base import RecordConflict, RolloutState, Store, VersionRecord

if TYPE_CHECKING:
    from grayagent.rollout.preflight import Item

Clock = Callable[[], float]
ACTIONS = ("pause", "resume", "promote", "abort")


class NoRollout(GrayagentError):
    """No rollout has been started (for a service, or at all)."""

    exit_code = 6


def state_of(store: Store) -> RolloutState:
    if not isinstance(store, RolloutState):
        raise UsageError(f"--store: {store.url}: this store keeps no rollout state (use a directory or etcd)")
    return store


def current_version(store: Store) -> VersionRecord:
    record = store.current()
    if record is None:
        raise UsageError(f"{store.url}: nothing has been published yet")
    return record


def spec_of(record: VersionRecord, store: Store, service: str) -> Rollout:
    release = parse_document(record.content, f"{store.url}#{record.version}")
    try:
        svc = release.service(service)
    except KeyError:
        raise UsageError(f"no service {service!r} in version {record.version}") from None
    if svc.rollout is None:
        raise UsageError(f"service {service!r} has no rollout section in version {record.version}")
    return svc.rollout


def read(state: RolloutState, service: str) -> tuple[RolloutRecord | None, int]:
    data, revision = state.read_record(service)
    return (RolloutRecord.from_json(data) if data is not None else None), revision


def write(state: RolloutState, rec: RolloutRecord, revision: int) -> int:
    return state.write_record(rec.service, rec.to_json(), revision)


def _no_rollout(service: str) -> NoRollout:
    return NoRollout(f"no rollout of {service!r} has been started (grayagent rollout start {service})")


def start(store: Store, service: str, clock: Clock = time.time, *, check: bool = False,
          force_reason: str | None = None, operator: str = "") -> RolloutRecord:
    """Begin the rollout defined in the current document; the controller publishes the steps.

    With `check`, the pre-flight checklist runs first: any failure refuses the start (PreflightFailed, nothing
    written) unless `force_reason` is given; a forced start keeps the failures, the reason and `operator` in
    the record (`forced`) and its events, and the controller audits it at its first tick.
    """
    state = state_of(store)
    current = current_version(store)
    spec = spec_of(current, store, service)
    existing, revision = read(state, service)
    if existing is not None and not existing.ended:
        raise UsageError(f"a rollout of {service!r} is already {existing.phase} "
                         f"(step {existing.step + 1}/{len(existing.steps)}); abort it first")
    now = clock()
    failed: list[Item] = []
    if check:
        from grayagent.rollout import preflight  # asks Prometheus: not imported by pause, resume or status

        failed = preflight.failures(preflight.checklist(store, current, spec, service, now))
    if failed and force_reason is None:
        raise PreflightFailed(service, failed)
    rec = RolloutRecord(
        service=service, steps=[s.describe() for s in spec.steps], canary=spec.canary, stable=spec.stable,
        base_version=current.version, weight=canary_weight(current.content, "current", service, spec.canary),
        failure_limit=spec.failure_limit, max_duration=spec.max_duration, on_failure=spec.on_failure)
    started = f"rollout {service}: started from version {current.version}"
    if failed:
        rec.forced = {"reason": force_reason, "by": operator, "time": now, "failed": [i.line() for i in failed]}
        started += (f" by {operator or 'an unnamed operator'}, FORCED past a failed pre-flight "
                    f"({', '.join(dict.fromkeys(i.item for i in failed))}); reason: {force_reason}")
    rec.event(now, started)
    write(state, rec, revision)
    return rec


class PreflightFailed(GrayagentError):
    """`rollout start` refused: the pre-flight checklist failed and no --force was given."""

    exit_code = 7

    def __init__(self, service: str, failed: list[Item]) -> None:
        self.failed = failed
        super().__init__(f"rollout {service}: not started, {len(failed)} pre-flight "
                         f"item{'' if len(failed) == 1 else 's'} failed (grayagent rollout check {service}); "
                         "fix them, or start with --force --reason TEXT")


def check(store: Store, service: str, clock: Clock = time.time) -> list[Item]:
    """The pre-flight checklist for SERVICE's rollout in the current version (`grayagent rollout check`); a
    rollout in progress is checked against its own revert target."""
    from grayagent.rollout import preflight

    state = state_of(store)
    current = current_version(store)
    spec = spec_of(current, store, service)
    existing, _ = read(state, service)
    running = existing if existing is not None and not existing.ended else None
    return preflight.checklist(store, current, spec, service, clock(), running)


def window(store: Store, service: str, now: float) -> dict[str, object] | None:
    """The release windows of SERVICE's rollout in the current version, as `rollout status` shows them; None
    without windows, or when the current version has no such rollout."""
    try:
        spec = spec_of(current_version(store), store, service)
    except GrayagentError:
        return None
    return windows.as_json(spec.windows, now)


def status(store: Store, service: str | None = None) -> list[RolloutRecord]:
    """The named rollout, or every one; NoRollout when there is none to show."""
    state = state_of(store)
    names = [service] if service else state.record_names()
    out = []
    for name in names:
        rec, _ = read(state, name)
        if rec is not None:
            out.append(rec)
        elif service:
            raise _no_rollout(service)
    if not out:
        raise NoRollout("no rollout has been started (grayagent rollout start SERVICE)")
    return out


def request(store: Store, service: str, action: str, clock: Clock = time.time) -> RolloutRecord:
    """Write a control request into the record (compare-and-set, retried); the controller acts on it."""
    if action not in ACTIONS:
        raise UsageError(f"unknown action {action!r}")
    state = state_of(store)
    for _ in range(20):
        rec, revision = read(state, service)
        if rec is None:
            raise _no_rollout(service)
        if rec.ended:
            raise UsageError(f"the rollout of {service!r} has already ended: {rec.phase}")
        if action in ("pause", "resume"):
            rec.requests["pause"] = action == "pause"
        else:
            rec.requests[action] = True
        rec.event(clock(), f"rollout {service}: {action} requested")
        try:
            write(state, rec, revision)
            return rec
        except RecordConflict:
            continue
    raise UsageError(f"could not record the {action} request: the rollout record keeps changing")


def status_stream(store: Store, service: str | None, watch: bool,
                  every: float = 1.0) -> Iterator[tuple[list[RolloutRecord], float]]:
    """The records once, or (with watch) every `every` seconds until all of them have ended."""
    while True:
        records = status(store, service)
        yield records, time.time()
        if not watch or all(r.ended for r in records):
            return
        time.sleep(every)


# ---------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True, slots=True)
class PlanStep:
    """One step of `grayagent rollout plan`: what it adds, where the canary stands after it, what gates it."""

    step: int                     # 1-based, as `rollout status` numbers them
    stage: int | None             # the routing step (`plan --stage K`); None for a pause
    adds: tuple[str, ...]         # audiences this step adds
    weight: int                   # the canary's weight after it, hundredths
    audiences: tuple[str, ...]    # every audience on the canary after it
    pause: float | str | None     # seconds, "manual", or None
    checks: tuple[str, ...]       # judged while the rollout is at this step and the canary serves traffic
    last: bool = False            # the rollout succeeds once this step has run: nothing is judged after it

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "stage": self.stage, "adds": list(self.adds), "weight": percent(self.weight),
                "audiences": list(self.audiences), "pause": self.pause, "checks": list(self.checks),
                "last": self.last}


@dataclass(frozen=True, slots=True)
class Plan:
    service: str
    canary: str
    stable: str
    weight: int                   # the canary's weight in the document, before any step
    steps: tuple[PlanStep, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"service": self.service, "canary": self.canary, "stable": self.stable, "weight": percent(self.weight),
                "steps": [s.as_dict() for s in self.steps]}


def check_descriptions(spec: Rollout) -> tuple[str, ...]:
    """The checks that judge the canary at every step while it serves traffic, as people read them."""
    analysis = spec.analysis
    if analysis is None:
        return ()
    out = []
    if analysis.max_error_rate is not None:
        out.append(f"5xx rate <= {analysis.max_error_rate * 100:g}%")
    if analysis.max_p99_latency_ms is not None:
        out.append(f"p99 <= {analysis.max_p99_latency_ms:g}ms")
    if analysis.max_error_rate_factor is not None:
        out.append(f"5xx rate <= {analysis.max_error_rate_factor:g}x stable")
    if analysis.max_p99_latency_factor is not None:
        out.append(f"p99 <= {analysis.max_p99_latency_factor:g}x stable")
    return tuple(out)


def _plan_service(path: str, service: str) -> tuple[bytes, Service]:
    content = read_document(path)
    release = parse_document(content, path)
    names = [s.name for s in release.services]
    if service not in names:
        raise UsageError(f"{path}: spec.services: no service {service!r} (services: {', '.join(names)})")
    svc = release.service(service)
    if svc.rollout is None:
        raise UsageError(f"{path}: spec.services[{names.index(service)}].rollout: service {service!r} has no "
                         "rollout section")
    return content, svc


def plan(path: str, service: str) -> Plan:
    """The timeline of SERVICE's rollout in the document FILE, step by step, without a store."""
    _, svc = _plan_service(path, service)
    spec = svc.rollout
    assert spec is not None
    own = current_stage(svc).weight
    checks = check_descriptions(spec)
    out = []
    for i, step in enumerate(spec.steps):
        stage = stage_number(spec, i)
        after = planned_stage(spec, stage, own)
        judged = (after.weight > 0 or bool(after.audiences)) and i < len(spec.steps) - 1
        out.append(PlanStep(i + 1, stage if step.routing else None,
                            (step.audience,) if step.audience is not None else (), after.weight, after.audiences,
                            "manual" if step.manual else step.pause, checks if judged else (),
                            i == len(spec.steps) - 1))
    return Plan(service, spec.canary, spec.stable, own, tuple(out))


def plan_stage(path: str, service: str, stage: int) -> bytes:
    """The complete document the `stage`-th routing step publishes (1-based; pauses are not counted)."""
    content, svc = _plan_service(path, service)
    assert svc.rollout is not None
    count = len(routing_steps(svc.rollout))
    if not 1 <= stage <= count:
        raise UsageError(f"--stage: {stage} is out of range: the rollout of {service!r} has {count} routing steps, "
                         f"so give 1 to {count} (pauses are not counted)")
    return stage_document(content, path, service, stage)
