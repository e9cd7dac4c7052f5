"""The rollout controller: one tick at a time, for every rollout record in the store.

State lives in the store (RolloutState): one JSON record per service (record.RolloutRecord), written with
compare-and-set, so
- a restarted controller resumes where the record says (the step, its start time, the analysis window);
- `pause`, `promote` and `abort` are requests written into the record (rollout.usecases), which the leading
  controller acts on at its next tick; they never race with the controller's own writes;
- two controllers never both act: only the holder of the store's leadership (leadership.Leader) ticks,
  and even a deposed leader's writes fail the compare-and-set on the record and on the current version.

The parts: `judging` runs the analysis, `steps` moves through the steps, `publishing` publishes steps and
rollbacks. Each move is a published version by `rollout-controller` whose message names the step, so history
shows the whole ramp and any step can be reverted with `grayagent revert`. Publishing is idempotent: the
controller first compares the document's stage (the canary's weight and audience rules) with the step's, so a
controller that crashed between publishing and saving its record does not publish the same step twice.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from grayagent.errors import Conflict, GrayagentError, InvalidDocument, UsageError
from grayagent.rollout import steps
from grayagent.rollout.judging import analyse
from grayagent.rollout.leadership import Leader, LeadershipLost
from grayagent.rollout.publishing import Publisher
from grayagent.rollout.record import RolloutRecord
from grayagent.rollout.sources import MetricsSource, check_metrics_host, source_for
from grayagent.rollout.usecases import current_version, read, spec_of, state_of, write
from grayagent.rules.model import Rollout
from grayagent.runtime.audit import AuditLog
from grayagent.stores.base import RecordConflict, Store

log = structlog.get_logger("grayagent.rollout")

Clock = Callable[[], float]


class Controller:
    def __init__(self, store: Store, interval: float = 2.0, clock: Clock = time.time,
                 holder: str | None = None, sources: Callable[[Rollout], MetricsSource] | None = None,
                 audit: AuditLog | None = None,
                 metrics_hosts: frozenset[tuple[str, int | None]] | None = None) -> None:
        self.store = store
        self.metrics_hosts = metrics_hosts  # None: any Prometheus host that is not link-local
        self.state = state_of(store)
        self.interval = interval
        self.clock = clock
        self.leader = Leader(self.state, holder or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}", store.url)
        self.sources = sources or (lambda spec: source_for(spec.analysis, store) if spec.analysis else _no_source())
        self.publisher = Publisher(store, self.leader, self._write, audit)
        self.ticks = 0  # ticks acted on as leader (tests use it to prove a follower never acts)

    @property
    def holder(self) -> str:
        return self.leader.holder

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
            self.leader.release()

    def lead(self) -> bool:
        return self.leader.lead()

    def tick(self) -> None:
        self.ticks += 1
        for name in self.state.record_names():
            if not self.leader.leading():
                return
            try:  # one broken record or service must not hold up the others
                rec, revision = read(self.state, name)
                if rec is None or rec.ended:
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

    def _write(self, rec: RolloutRecord, revision: int) -> int:
        self.leader.guard()
        return write(self.state, rec, revision)

    def step(self, service: str, rec: RolloutRecord, revision: int) -> None:
        """Decide, record the decision (compare-and-set), and only then publish.

        A controller that was deposed, or raced by a CLI request, fails at the record write and never
        publishes. `current` is read before that write, so a version published after it by anyone makes
        the publish fail with Conflict, and the tick is abandoned rather than applied on top.
        """
        rec.service = service
        before = rec.to_json()  # write only what changed: etcd keeps every revision
        now = self.clock()
        current = current_version(self.store)
        if rec.phase == "rolling-back":  # a rollback was decided: finish it before anything else
            self.publisher.complete_rollback(rec, revision, current, now)
            return
        try:
            spec = spec_of(current, self.store, service)
            if spec.analysis is not None and spec.analysis.prometheus is not None:
                check_metrics_host(spec.analysis.prometheus.url, self.metrics_hosts)
        except (UsageError, InvalidDocument) as exc:
            rec.phase, rec.reason = "aborted", f"stopped without rollback: {exc}"
            rec.event(now, f"rollout {service}: {rec.reason}")
            self._write(rec, revision)
            return
        if rec.started_at is None:  # `start` leaves the stamp to the controller's clock
            rec.started_at = rec.step_started_at = now
            if rec.forced is not None:  # started past a failed pre-flight: into the controller's audit log
                self.publisher.audit("rollout-forced-start", service=service, base_version=rec.base_version,
                                     reason=rec.forced.get("reason"), by=rec.forced.get("by"),
                                     failed=rec.forced.get("failed"))
        publish: tuple[int, str] | None = None
        if rec.requests.get("abort"):
            self.publisher.begin_rollback(rec, spec, "aborted", "abort requested", now)
        elif spec.max_duration is not None and _elapsed(now, rec.started_at) > spec.max_duration:
            self.publisher.begin_rollback(rec, spec, "rolled-back", f"maxDuration {spec.max_duration:g}s exceeded",
                                          now)
        elif not analyse(rec, spec, self.sources(spec), now):
            self.publisher.begin_rollback(
                rec, spec, "rolled-back", f"analysis failed {rec.failures} times (failureLimit {spec.failure_limit})",
                now)
        else:
            publish = steps.advance(rec, spec, self.publisher.current_stage(current, service), now)
        if rec.phase == "rolling-back":
            revision = self._write(rec, revision)  # the decision first: a crash cannot lose it
            self.publisher.complete_rollback(rec, revision, current, now, fenced=True)
            return
        if publish is not None:
            revision = self._write(rec, revision)  # fence: a stale controller stops here
            before = rec.to_json()
            self.publisher.publish_step(rec, spec, current, publish, now)
        if rec.to_json() != before:
            self._write(rec, revision)
            if rec.phase == "succeeded":
                self.publisher.audit("rollout-done", service=service, weight=rec.weight)


def _elapsed(now: float, since: float) -> float:
    return max(0.0, now - since)  # a clock that went back never makes time negative


class _NoSource:
    def measure(self, *args: Any) -> tuple[None, dict[str, Any]]:
        return None, {}


def _no_source() -> MetricsSource:
    return _NoSource()
