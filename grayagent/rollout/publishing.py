"""What the controller publishes: weight steps and rollbacks, each fenced by the leadership and audited.

A rollback is recorded first (phase rolling-back, with its reason and RollbackTarget), then completed here.
Completing is idempotent, so whichever controller sees "rolling-back" (after a crash or a lost leadership)
finishes it. A revert target that cannot be read or parsed falls back to setting the canary's weight to 0,
in one place (`_revert_content`), whether the rollback was just decided or found in the record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from grayagent.errors import GrayagentError
from grayagent.rollout import steps
from grayagent.rollout.document import (
    Stage,
    canary_weight,
    rollback_document,
    stage_document,
    stage_of,
    without_audiences,
)
from grayagent.rollout.leadership import Leader
from grayagent.rollout.record import RollbackTarget, RolloutRecord
from grayagent.rules.model import Rollout
from grayagent.runtime.audit import AuditLog
from grayagent.stores.base import Store, VersionRecord

log = structlog.get_logger("grayagent.rollout")

AUTHOR = "rollout-controller"
WriteRecord = Callable[[RolloutRecord, int], int]


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class Publisher:
    def __init__(self, store: Store, leader: Leader, write: WriteRecord, audit: AuditLog | None) -> None:
        self.store = store
        self.leader = leader
        self.write = write     # the fenced record write
        self.audit_log = audit  # hash-chained record of every publish and rollback this controller made

    def audit(self, event: str, **fields: Any) -> None:
        if self.audit_log is None:
            return
        try:
            self.audit_log.append(event, holder=self.leader.holder, store=self.store.url, **fields)
        except OSError as exc:  # the store holds the truth; a full disk must not stop a rollback
            log.error("rollout audit append failed", error=str(exc))

    def _source(self, record: VersionRecord) -> str:
        return f"{self.store.url}#{record.version}"

    def current_stage(self, current: VersionRecord, service: str) -> Stage:
        return stage_of(current.content, self._source(current), service)

    def publish_step(self, rec: RolloutRecord, spec: Rollout, current: VersionRecord, publish: tuple[int, str],
                     now: float) -> None:
        """Publish the stage document of a routing step the record already committed to; a Conflict abandons the
        tick (not retried)."""
        stage, message = publish
        source = self._source(current)
        content = stage_document(current.content, source, rec.service, stage)
        reached = stage_of(content, source, rec.service)
        self.leader.guard()
        meta = self.store.publish(content, current.version, AUTHOR, message)
        rec.versions.append(meta.version)
        rec.event(now, f"{message}: version {meta.version}")
        self.audit("rollout-step", service=rec.service, step=rec.step + 1, weight=reached.weight,
                   audiences=list(reached.audiences), version=meta.version, message=message)
        rec.weight, rec.audiences = reached.weight, list(reached.audiences)
        steps.next_step(rec, spec, now)

    @staticmethod
    def begin_rollback(rec: RolloutRecord, spec: Rollout, phase: str, reason: str, now: float) -> None:
        """Record the decision (phase rolling-back, its reason and target); complete_rollback publishes it."""
        rec.rollback = RollbackTarget(phase=phase, canary=spec.canary, stable=spec.stable, on_failure=spec.on_failure,
                                      version=rec.base_version if spec.on_failure == "revert" else None)
        rec.phase, rec.reason = "rolling-back", reason
        rec.event(now, f"rollout {rec.service}: rolling back ({reason})")

    def _revert_content(self, rec: RolloutRecord, target: RollbackTarget) -> tuple[bytes, int, int] | None:
        """(content, canary weight, version) of the revert target; None, after switching the target to zero
        and saying why in the reason, when that version cannot be read or parsed."""
        try:
            if target.version is None:
                raise KeyError("no version recorded")
            base = self.store.get(target.version)
            source = self._source(base)
            # An earlier rollout may have left audience rules in it: a rollback sends them back to stable too.
            return without_audiences(base.content, source, rec.service), \
                canary_weight(base.content, source, rec.service, target.canary), base.version
        except (GrayagentError, KeyError, TypeError, ValueError) as exc:
            target.on_failure = "zero"
            rec.reason = (f"{rec.reason or ''}; cannot revert to version {target.version} ({_first_line(exc)}), "
                          "set the canary weight to 0 instead")
            return None

    def complete_rollback(self, rec: RolloutRecord, revision: int, current: VersionRecord, now: float,
                          fenced: bool = False) -> None:
        """Publish the recorded rollback unless the current version already is it, then mark it done.

        Unless the caller just wrote the record (`fenced`), the record is written once more before publishing:
        a controller holding a stale record (the rollout since finished or started again) stops there.
        """
        service = rec.service
        if rec.rollback is None:
            rec.rollback = RollbackTarget(phase="rolled-back", canary=rec.canary, stable=rec.stable,
                                          on_failure="zero")
        target = rec.rollback
        content: bytes | None = None
        weight = 0
        revert = self._revert_content(rec, target) if target.on_failure == "revert" else None
        label = f"rollout {service}: rolled back ({rec.reason or ''})"
        if revert is not None:
            content, weight, version = revert
            message = f"{label}: revert to version {version}"
        else:
            message = f"{label}: canary weight 0%"
            try:  # weight 0 and no audience rules; None when the current version already is so
                content = rollback_document(current.content, self._source(current), service, target.canary,
                                            target.stable)
            except KeyError:  # the service is gone from the current version: no canary weight to take back
                rec.event(now, f"rollout {service}: no service {service!r} in version {current.version}")
        if content is None or content == current.content:
            rec.event(now, f"{label}: the current version already matches")
        else:
            if not fenced:
                rec.event(now, f"rollout {service}: completing the recorded rollback")
                revision = self.write(rec, revision)
            self.leader.guard()
            meta = self.store.publish(content, current.version, AUTHOR, message)  # Conflict: the next tick retries
            rec.versions.append(meta.version)
            rec.event(now, f"{message}: version {meta.version}")
            self.audit("rollout-rollback", service=service, version=meta.version, on_failure=target.on_failure,
                       reason=rec.reason, message=message)
        rec.phase = target.phase
        rec.finished_at = now
        rec.weight, rec.audiences = weight, []
        log.warning("rollout rolled back", service=service, reason=rec.reason, on_failure=target.on_failure)
        self.write(rec, revision)
