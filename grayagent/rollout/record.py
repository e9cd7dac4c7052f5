"""The rollout record: one per service, kept in the store as JSON (RolloutState), read and written only here.

`RolloutRecord.from_json` reads every record written so far (missing keys take their defaults, unknown keys
are kept and written back), and `to_json` writes the same keys as before, so `-o json` and records already
in a store keep their shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import structlog

log = structlog.get_logger("grayagent.rollout")

TERMINAL = ("succeeded", "rolled-back", "aborted")
KEEP_ANALYSES = 20
KEEP_EVENTS = 50


def pct(hundredths: int) -> str:
    return f"{Decimal(hundredths) / 100:g}%"


@dataclass(slots=True)
class RollbackTarget:
    """What a recorded rollback publishes: `on_failure` revert (to `version`) or zero (the canary's weight)."""

    phase: str                    # the phase once it is done: rolled-back or aborted
    canary: str
    stable: str
    on_failure: str
    version: int | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any], rec: RolloutRecord) -> RollbackTarget:
        version = data.get("version")
        return cls(phase=str(data.get("phase", "rolled-back")), canary=str(data.get("canary", rec.canary)),
                   stable=str(data.get("stable", rec.stable)), on_failure=str(data.get("on_failure", "zero")),
                   version=version if isinstance(version, int) else None)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"phase": self.phase, "canary": self.canary, "stable": self.stable,
                               "on_failure": self.on_failure}
        if self.version is not None:
            out["version"] = self.version
        return out


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass(slots=True)
class RolloutRecord:
    service: str
    phase: str = "progressing"        # progressing, paused, rolling-back, or one of TERMINAL
    step: int = 0                     # index of the current step
    steps: list[str] = field(default_factory=list)  # each step described, for status
    canary: str = ""
    stable: str = ""
    base_version: int = 0             # the current version when the rollout started
    weight: int = 0                   # the canary's weight, hundredths of a percent
    failures: int = 0
    failure_limit: int = 0
    max_duration: float | None = None
    on_failure: str = "revert"
    started_at: float | None = None   # stamped by the controller's clock at its first tick
    step_started_at: float | None = None
    finished_at: float | None = None
    last_analysis_at: float | None = None
    analyses: list[dict[str, Any]] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)   # the versions the controller published
    window: dict[str, Any] | None = None                # the metrics source's baseline sample
    requests: dict[str, bool] = field(default_factory=dict)  # pause, promote, abort
    events: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None
    rollback: RollbackTarget | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they were
    held: str | None = None           # the last "held by window until …" note (rollout/windows.py)
    forced: dict[str, Any] | None = None  # a start past a failed pre-flight: reason, failures, who, when
    audiences: list[str] = field(default_factory=list)  # the audiences sent to the canary, in the order added

    @property
    def ended(self) -> bool:
        return self.phase in TERMINAL

    def event(self, now: float, message: str) -> None:
        self.events.append({"time": now, "message": message})
        del self.events[:-KEEP_EVENTS]
        log.info(message, service=self.service)

    def add_analysis(self, entry: dict[str, Any]) -> None:
        self.analyses.append(entry)
        del self.analyses[:-KEEP_ANALYSES]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutRecord:
        known = set(cls.__dataclass_fields__) - {"extra"}
        rec = cls(
            service=str(data.get("service", "")), phase=str(data.get("phase", "progressing")),
            step=int(data.get("step", 0)), steps=[str(s) for s in data.get("steps") or []],
            canary=str(data.get("canary", "")), stable=str(data.get("stable", "")),
            base_version=int(data.get("base_version") or 0), weight=int(data.get("weight") or 0),
            failures=int(data.get("failures") or 0), failure_limit=int(data.get("failure_limit") or 0),
            max_duration=_float(data.get("max_duration")), on_failure=str(data.get("on_failure", "revert")),
            started_at=_float(data.get("started_at")), step_started_at=_float(data.get("step_started_at")),
            finished_at=_float(data.get("finished_at")), last_analysis_at=_float(data.get("last_analysis_at")),
            analyses=list(data.get("analyses") or []), versions=[int(v) for v in data.get("versions") or []],
            window=data.get("window") if isinstance(data.get("window"), dict) else None,
            requests={str(k): bool(v) for k, v in (data.get("requests") or {}).items()},
            events=list(data.get("events") or []),
            reason=str(data["reason"]) if data.get("reason") is not None else None,
            extra={k: v for k, v in data.items() if k not in known},
        )
        if isinstance(data.get("rollback"), dict):
            rec.rollback = RollbackTarget.from_json(data["rollback"], rec)
        rec.held = str(data["held"]) if data.get("held") is not None else None
        rec.forced = data["forced"] if isinstance(data.get("forced"), dict) else None
        rec.audiences = [str(a) for a in data.get("audiences") or []]
        return rec

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.extra,
            "service": self.service, "phase": self.phase, "step": self.step, "steps": list(self.steps),
            "canary": self.canary, "stable": self.stable, "started_at": self.started_at,
            "step_started_at": self.step_started_at, "base_version": self.base_version, "weight": self.weight,
            "failures": self.failures, "failure_limit": self.failure_limit, "max_duration": self.max_duration,
            "on_failure": self.on_failure, "analyses": list(self.analyses), "versions": list(self.versions),
            "window": self.window, "last_analysis_at": self.last_analysis_at, "requests": dict(self.requests),
            "events": list(self.events),
        }
        # Written only once set, as before: records stay the shape tools already read.
        if self.finished_at is not None:
            out["finished_at"] = self.finished_at
        if self.reason is not None:
            out["reason"] = self.reason
        if self.rollback is not None:
            out["rollback"] = self.rollback.to_json()
        if self.held is not None:
            out["held"] = self.held
        if self.forced is not None:
            out["forced"] = self.forced
        if self.audiences:
            out["audiences"] = list(self.audiences)
        return out
