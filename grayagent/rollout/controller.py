"""The rollout controller and the use cases behind `grayagent rollout start|status|pause|resume|promote|abort`.

State lives in the store (RolloutState): one JSON record per service, written with compare-and-set, so
- a restarted controller resumes where the record says (the step, its start time, the analysis window);
- `pause`, `promote` and `abort` are requests written into the record, which the leading controller acts on
  at its next tick; they never race with the controller's own writes;
- two controllers never both act: only the holder of the store's leadership (flock / etcd lease) ticks,
  and even a deposed leader's writes fail the compare-and-set on the record and on the current version.

Each move is a published version by `rollout-controller` whose message names the step, so history shows the
whole ramp and any step can be reverted with `grayagent revert`. Publishing is idempotent: the controller
first compares the document's weight with the step's, so a controller that crashed between publishing
and saving its record does not publish the same step twice.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import structlog

from grayagent.audit import AuditLog
from grayagent.errors import Conflict, GrayagentError, InvalidDocument, UsageError
from grayagent.model import Rollout, RolloutStep, parse_document
from grayagent.rollout.analysis import judge
from grayagent.rollout.document import canary_weight, set_canary_weight
from grayagent.rollout.sources import MetricsSource, source_for
from grayagent.stores.base import Leadership, RecordConflict, RolloutState, Store, VersionRecord

log = structlog.get_logger("grayagent.rollout")

AUTHOR = "rollout-controller"
TERMINAL = ("succeeded", "rolled-back", "aborted")
KEEP_ANALYSES = 20
KEEP_EVENTS = 50
Clock = Callable[[], float]


def _pct(hundredths: int) -> str:
    return f"{Decimal(hundredths) / 100:g}%"


def state_of(store: Store) -> RolloutState:
    if not isinstance(store, RolloutState):
        raise UsageError(f"--store: {store.url}: this store keeps no rollout state (use a directory or etcd)")
    return store


def _current(store: Store) -> VersionRecord:
    record = store.current()
    if record is None:
        raise UsageError(f"{store.url}: nothing has been published yet")
    return record


def _spec(record: VersionRecord, store: Store, service: str) -> Rollout:
    release = parse_document(record.content, f"{store.url}#{record.version}")
    try:
        svc = release.service(service)
    except KeyError:
        raise UsageError(f"no service {service!r} in version {record.version}") from None
    if svc.rollout is None:
        raise UsageError(f"service {service!r} has no rollout section in version {record.version}")
    return svc.rollout


def _event(rec: dict[str, Any], now: float, message: str) -> None:
    rec.setdefault("events", []).append({"time": now, "message": message})
    del rec["events"][:-KEEP_EVENTS]
    log.info(message, service=rec["service"])


# ---------------------------------------------------------------------------------------------- use cases


def start(store: Store, service: str, clock: Clock = time.time) -> dict[str, Any]:
    """Begin the rollout defined in the current document; the controller publishes the steps."""
    state = state_of(store)
    current = _current(store)
    spec = _spec(current, store, service)
    existing, revision = state.read_record(service)
    if existing is not None and existing.get("phase") not in TERMINAL:
        raise UsageError(f"a rollout of {service!r} is already {existing.get('phase')} "
                         f"(step {existing.get('step', 0) + 1}/{len(existing.get('steps', []))}); abort it first")
    now = clock()
    rec: dict[str, Any] = {
        "service": service, "phase": "progressing", "step": 0, "steps": [s.describe() for s in spec.steps],
        "canary": spec.canary, "stable": spec.stable, "started_at": None, "step_started_at": None,
        "base_version": current.version, "weight": canary_weight(current.content, "current", service, spec.canary),
        "failures": 0, "failure_limit": spec.failure_limit, "max_duration": spec.max_duration,
        "on_failure": spec.on_failure, "analyses": [], "versions": [], "window": None, "last_analysis_at": None,
        "requests": {}, "events": [],
    }
    _event(rec, now, f"rollout {service}: started from version {current.version}")
    state.write_record(service, rec, revision)
    return rec


def status(store: Store, service: str | None = None) -> list[dict[str, Any]]:
    state = state_of(store)
    names = [service] if service else state.record_names()
    out = []
    for name in names:
        rec, _ = state.read_record(name)
        if rec is None:
            if service:
                raise UsageError(f"no rollout of {service!r} has been started")
            continue
        out.append(rec)
    return out


ACTIONS = ("pause", "resume", "promote", "abort")


def request(store: Store, service: str, action: str, clock: Clock = time.time) -> dict[str, Any]:
    """Write a control request into the record (compare-and-set, retried); the controller acts on it."""
    if action not in ACTIONS:
        raise UsageError(f"unknown action {action!r}")
    state = state_of(store)
    for _ in range(20):
        rec, revision = state.read_record(service)
        if rec is None:
            raise UsageError(f"no rollout of {service!r} has been started")
        if rec.get("phase") in TERMINAL:
            raise UsageError(f"the rollout of {service!r} has already ended: {rec['phase']}")
        requests = rec.setdefault("requests", {})
        if action == "pause":
            requests["pause"] = True
        elif action == "resume":
            requests["pause"] = False
        else:
            requests[action] = True
        _event(rec, clock(), f"rollout {service}: {action} requested")
        try:
            state.write_record(service, rec, revision)
            return rec
        except RecordConflict:
            continue
    raise UsageError(f"could not record the {action} request: the rollout record keeps changing")


# ---------------------------------------------------------------------------------------------- controller


class Controller:
    def __init__(self, store: Store, interval: float = 2.0, clock: Clock = time.time,
                 holder: str | None = None, sources: Callable[[Rollout], MetricsSource] | None = None,
                 audit: AuditLog | None = None) -> None:
        self.store = store
        self.audit = audit  # hash-chained record of every publish and rollback this controller made
        self.state = state_of(store)
        self.interval = interval
        self.clock = clock
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.sources = sources or (lambda spec: source_for(spec.analysis, store) if spec.analysis else _no_source())
        self.leadership: Leadership | None = None
        self.ticks = 0  # ticks acted on as leader (tests use it to prove a follower never acts)

    # ------------------------------------------------------------------ loop

    def run(self, stop: threading.Event, ready: Callable[[], None] | None = None) -> None:
        try:
            while not stop.is_set():
                if self.lead():
                    try:
                        self.tick()
                    except GrayagentError as exc:  # store hiccup: keep the record, try again next tick
                        log.warning("rollout tick failed", error=str(exc))
                    except Exception:  # a bug must not end the service; the record is untouched
                        log.exception("rollout tick crashed")
                if ready is not None:
                    ready()
                    ready = None
                stop.wait(self.interval)
        finally:
            if self.leadership is not None:
                self.leadership.release()
                self.leadership = None

    def lead(self) -> bool:
        if self.leadership is not None and not self.leadership.held():
            log.warning("rollout leadership lost", holder=self.holder)
            self.leadership.release()
            self.leadership = None
        if self.leadership is None:
            try:
                self.leadership = self.state.acquire_leadership(self.holder)
            except GrayagentError as exc:
                log.warning("leader election failed", error=str(exc))
                return False
            if self.leadership is not None:
                log.info("leading rollouts", holder=self.holder, store=self.store.url)
        return self.leadership is not None

    def tick(self) -> None:
        self.ticks += 1
        for name in self.state.record_names():
            if not self._leading():
                return
            try:  # one broken record or service must not hold up the others
                rec, revision = self.state.read_record(name)
                if rec is None or rec.get("phase") in TERMINAL:
                    continue
                self.step(name, rec, revision)
            except (RecordConflict, Conflict, LeadershipLost) as exc:
                # Someone else wrote the record or published meanwhile: nothing of this tick's decision was
                # published; the next tick decides again from fresh state.
                log.info("rollout tick abandoned", service=name, reason=str(exc))
            except GrayagentError as exc:
                log.warning("rollout tick failed", service=name, error=str(exc))
            except Exception:
                log.exception("rollout tick crashed", service=name)

    def _leading(self) -> bool:
        return self.leadership is None or self.leadership.held()

    def _guard(self) -> None:
        """Called immediately before every publish and record write."""
        if not self._leading():
            raise LeadershipLost("rollout leadership lost")

    def _write(self, service: str, rec: dict[str, Any], revision: int) -> int:
        self._guard()
        return self.state.write_record(service, rec, revision)

    # ------------------------------------------------------------------ one rollout

    def step(self, service: str, rec: dict[str, Any], revision: int) -> None:
        """Decide, record the decision (compare-and-set), and only then publish.

        A controller that was deposed, or raced by a CLI request, fails at the record write and never
        publishes. `current` is read before that write, so a version published after it by anyone makes
        the publish fail with Conflict, and the tick is abandoned rather than applied on top.
        """
        before = json.dumps(rec, sort_keys=True)  # write only what changed: etcd keeps every revision
        now = self.clock()
        current = _current(self.store)
        if rec.get("phase") == "rolling-back":  # a rollback was decided: finish it before anything else
            self._complete_rollback(service, rec, revision, current, now)
            return
        try:
            spec = _spec(current, self.store, service)
        except (UsageError, InvalidDocument) as exc:
            rec["phase"], rec["reason"] = "aborted", f"stopped without rollback: {exc}"
            _event(rec, now, f"rollout {service}: {rec['reason']}")
            self._write(service, rec, revision)
            return
        if rec.get("started_at") is None:  # `start` leaves the stamp to the controller's clock
            rec["started_at"] = rec["step_started_at"] = now
        requests = rec.setdefault("requests", {})
        publish: tuple[int, str] | None = None
        if requests.get("abort"):
            self._begin_rollback(service, rec, spec, "aborted", "abort requested", now)
        elif spec.max_duration is not None and _elapsed(now, rec["started_at"]) > spec.max_duration:
            self._begin_rollback(service, rec, spec, "rolled-back",
                                 f"maxDuration {spec.max_duration:g}s exceeded", now)
        elif not self._analyse(service, rec, spec, now):
            self._begin_rollback(service, rec, spec, "rolled-back",
                                 f"analysis failed {rec['failures']} times (failureLimit {spec.failure_limit})", now)
        else:
            publish = self._advance(service, rec, spec, current, now)
        if rec["phase"] == "rolling-back":
            revision = self._write(service, rec, revision)  # the decision first: a crash cannot lose it
            self._complete_rollback(service, rec, revision, current, now, fenced=True)
            return
        if publish is not None:
            revision = self._write(service, rec, revision)  # fence: a stale controller stops here
            before = json.dumps(rec, sort_keys=True)
            self._publish_step(service, rec, spec, current, publish, now)
        if json.dumps(rec, sort_keys=True) != before:
            self._write(service, rec, revision)

    def _analyse(self, service: str, rec: dict[str, Any], spec: Rollout, now: float) -> bool:
        """Run the analysis when its interval has passed; False once failures exceed the limit."""
        if spec.analysis is None or rec.get("weight", 0) <= 0:
            return True
        last = rec.get("last_analysis_at")
        if last is not None and 0 <= now - last < spec.analysis.interval:  # a clock that went back: due
            return True
        rec["last_analysis_at"] = now
        source = self.sources(spec)
        try:
            measured, rec["window"] = source.measure(service, (spec.canary, spec.stable), rec.get("window"),
                                                     spec.analysis)
        except GrayagentError as exc:
            measured = None
            rec.setdefault("analyses", []).append({"time": now, "result": "inconclusive", "reasons": [str(exc)]})
            del rec["analyses"][:-KEEP_ANALYSES]
        if measured is None:
            return True
        canary, stable = measured
        verdict = judge(spec.analysis, canary, stable)
        entry = {"time": now, "step": rec["step"], "weight": rec.get("weight", 0), "result": verdict.result,
                 "reasons": list(verdict.reasons), "canary": canary.as_dict(), "stable": stable.as_dict()}
        rec.setdefault("analyses", []).append(entry)
        del rec["analyses"][:-KEEP_ANALYSES]
        if verdict.result == "fail":
            rec["failures"] = rec.get("failures", 0) + 1
            _event(rec, now, f"rollout {service}: analysis failed ({rec['failures']}/{spec.failure_limit + 1}): "
                             + "; ".join(verdict.reasons))
        return int(rec.get("failures", 0)) <= spec.failure_limit

    def _advance(self, service: str, rec: dict[str, Any], spec: Rollout, current: VersionRecord,
                 now: float) -> tuple[int, str] | None:
        """Move through the steps; (weight, message) when a weight step needs a publish (after the record write)."""
        requests = rec["requests"]
        if requests.get("pause") and not requests.get("promote"):
            if rec["phase"] != "paused":
                rec["phase"] = "paused"
                _event(rec, now, f"rollout {service}: paused at step {rec['step'] + 1}/{len(spec.steps)}")
            return None
        if rec["phase"] == "paused":
            rec["phase"] = "progressing"
            requests["pause"] = False
            rec["step_started_at"] = now  # a timed pause restarts after a manual pause
            _event(rec, now, f"rollout {service}: resumed")
        index = int(rec["step"])
        if index >= len(spec.steps):
            self._finish(service, rec, now)
            return None
        step: RolloutStep = spec.steps[index]
        label = f"rollout {service}: step {index + 1}/{len(spec.steps)}"
        if step.weight is not None:
            # A pending promote is kept for the next pause: it was meant for a gate, not for this step.
            if canary_weight(current.content, f"{self.store.url}#{current.version}", service,
                             spec.canary) != step.weight:
                return step.weight, f"{label} weight {_pct(step.weight)}"
            rec["weight"] = step.weight  # already there (published before a crash, or by a person)
        elif requests.pop("promote", None):
            _event(rec, now, f"{label} ({step.describe()}) promoted")
        elif step.manual:
            return None  # waiting for `promote`
        else:
            if now < rec["step_started_at"]:  # the clock went back: the pause starts over from now
                rec["step_started_at"] = now
            if now - rec["step_started_at"] < (step.pause or 0.0):
                return None  # waiting for the pause to run out
        self._next_step(service, rec, spec, now)
        return None

    def _next_step(self, service: str, rec: dict[str, Any], spec: Rollout, now: float) -> None:
        rec["step"] = int(rec["step"]) + 1
        rec["step_started_at"] = now
        if rec["step"] >= len(spec.steps):
            self._finish(service, rec, now)

    def _finish(self, service: str, rec: dict[str, Any], now: float) -> None:
        rec["phase"] = "succeeded"
        rec["finished_at"] = now
        _event(rec, now, f"rollout {service}: succeeded at canary weight {_pct(rec.get('weight', 0))}")
        self._audit("rollout-done", service=service, weight=rec.get("weight", 0))

    def _audit(self, event: str, **fields: Any) -> None:
        if self.audit is None:
            return
        try:
            self.audit.append(event, holder=self.holder, store=self.store.url, **fields)
        except OSError as exc:  # the store holds the truth; a full disk must not stop a rollback
            log.error("rollout audit append failed", error=str(exc))

    def _publish_step(self, service: str, rec: dict[str, Any], spec: Rollout, current: VersionRecord,
                      publish: tuple[int, str], now: float) -> None:
        """Publish a weight step the record already committed to; a Conflict abandons the tick (not retried)."""
        weight, message = publish
        content = set_canary_weight(current.content, f"{self.store.url}#{current.version}", service, spec.canary,
                                    spec.stable, weight)
        self._guard()
        meta = self.store.publish(content, current.version, AUTHOR, message)
        rec.setdefault("versions", []).append(meta.version)
        _event(rec, now, f"{message}: version {meta.version}")
        self._audit("rollout-step", service=service, step=rec["step"] + 1, weight=weight, version=meta.version,
                    message=message)
        rec["weight"] = weight
        self._next_step(service, rec, spec, now)

    def _begin_rollback(self, service: str, rec: dict[str, Any], spec: Rollout, phase: str, reason: str,
                        now: float) -> None:
        """Record the decision (phase rolling-back, its reason and target); _complete_rollback publishes it."""
        on_failure = spec.on_failure
        target: dict[str, Any] = {"phase": phase, "canary": spec.canary, "stable": spec.stable}
        if on_failure == "revert":
            try:
                base = self.store.get(int(rec["base_version"]))
                parse_document(base.content, f"{self.store.url}#{base.version}")
                target["version"] = base.version
            except (GrayagentError, KeyError, TypeError, ValueError) as exc:
                on_failure = "zero"
                reason += f"; cannot revert to version {rec.get('base_version')} ({_first_line(exc)}), " \
                          "set the canary weight to 0 instead"
        target["on_failure"] = on_failure
        rec["phase"], rec["reason"], rec["rollback"] = "rolling-back", reason, target
        _event(rec, now, f"rollout {service}: rolling back ({reason})")

    def _complete_rollback(self, service: str, rec: dict[str, Any], revision: int, current: VersionRecord,
                           now: float, fenced: bool = False) -> None:
        """Publish the recorded rollback unless the current version already is it, then mark it done.

        Idempotent, so whichever controller sees "rolling-back" (after a crash or a lost leadership) finishes it.
        Unless the caller just wrote the record (`fenced`), the record is written once more before publishing:
        a controller holding a stale record (the rollout since finished or started again) stops there.
        """
        target = rec.setdefault("rollback", {})
        label = f"rollout {service}: rolled back ({rec.get('reason', '')})"
        source = f"{self.store.url}#{current.version}"
        canary, stable = str(target.get("canary", rec.get("canary"))), str(target.get("stable", rec.get("stable")))
        content: bytes | None = None
        if target.get("on_failure") == "revert":
            try:
                base = self.store.get(int(target["version"]))
                weight = canary_weight(base.content, f"{self.store.url}#{base.version}", service, canary)
                content, message = base.content, f"{label}: revert to version {base.version}"
            except (GrayagentError, KeyError, TypeError, ValueError) as exc:
                target["on_failure"] = "zero"
                rec["reason"] = (f"{rec.get('reason', '')}; cannot revert to version {target.get('version')} "
                                 f"({_first_line(exc)}), set the canary weight to 0 instead")
                label = f"rollout {service}: rolled back ({rec['reason']})"
        if content is None:
            weight, message = 0, f"{label}: canary weight 0%"
            try:
                if canary_weight(current.content, source, service, canary) != 0:
                    content = set_canary_weight(current.content, source, service, canary, stable, 0)
            except KeyError:  # the service is gone from the current version: no canary weight to take back
                _event(rec, now, f"rollout {service}: no service {service!r} in version {current.version}")
        if content is None or content == current.content:
            _event(rec, now, f"{label}: the current version already matches")
        else:
            if not fenced:
                _event(rec, now, f"rollout {service}: completing the recorded rollback")
                revision = self._write(service, rec, revision)
            self._guard()
            meta = self.store.publish(content, current.version, AUTHOR, message)  # Conflict: the next tick retries
            rec.setdefault("versions", []).append(meta.version)
            _event(rec, now, f"{message}: version {meta.version}")
            self._audit("rollout-rollback", service=service, version=meta.version,
                        on_failure=target.get("on_failure"), reason=rec.get("reason"), message=message)
        rec["phase"] = target.get("phase", "rolled-back")
        rec["finished_at"] = now
        rec["weight"] = weight
        log.warning("rollout rolled back", service=service, reason=rec.get("reason"),
                    on_failure=target.get("on_failure"))
        self._write(service, rec, revision)


class LeadershipLost(GrayagentError):
    """This controller may no longer lead: it must neither publish nor write a record."""


def _elapsed(now: float, since: float) -> float:
    return max(0.0, now - since)  # a clock that went back never makes time negative


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class _NoSource:
    def measure(self, *args: Any) -> tuple[None, dict[str, Any]]:
        return None, {}


def _no_source() -> MetricsSource:
    return _NoSource()


def format_status(rec: dict[str, Any], now: float) -> str:
    """Human-readable status: the steps with a marker, the weight, and each recent analysis."""
    steps = rec.get("steps", [])
    index = int(rec.get("step", 0))
    lines = [f"rollout {rec['service']}: {rec['phase']}  canary {rec.get('canary')} at {_pct(rec.get('weight', 0))}"
             f"  failures {rec.get('failures', 0)}/{rec.get('failure_limit', 0) + 1}"
             + (f"  running {_elapsed(now, rec['started_at']):.0f}s" if rec.get("started_at") is not None
                else "  not started by a controller yet")
             + (f" of max {rec['max_duration']:g}s" if rec.get("max_duration") else "")
             + f"  (from version {rec.get('base_version')})"]
    if rec.get("reason"):
        lines.append(f"  reason: {rec['reason']}")
    pending = [k for k, v in rec.get("requests", {}).items() if v]
    if pending and rec["phase"] not in TERMINAL:
        lines.append(f"  requested: {', '.join(pending)}")
    for i, text in enumerate(steps):
        mark = "done" if i < index else ("  ->" if i == index and rec["phase"] not in TERMINAL else "")
        lines.append(f"  {mark:>4} {i + 1:>2}. {text}")
    for a in rec.get("analyses", [])[-5:]:
        canary = a.get("canary") or {}
        figures = (f"requests {canary.get('requests')} 5xx {canary.get('error_rate')} p99 {canary.get('p99_ms')}ms"
                   if canary else "")
        reasons = "; ".join(a.get("reasons", []))
        lines.append(f"  analysis {a['result']:12} {figures}  {reasons}".rstrip())
    return "\n".join(lines)


def status_stream(store: Store, service: str | None, watch: bool,
                  every: float = 1.0) -> Iterator[tuple[list[dict[str, Any]], float]]:
    """The records once, or (with watch) every `every` seconds until all of them have ended."""
    while True:
        records = status(store, service)
        yield records, time.time()
        if not watch or all(r.get("phase") in TERMINAL for r in records):
            return
        time.sleep(every)
