"""The agent's status and everything derived from it: health, metrics, status.json, the fleet report, audit.

`StatusKeeper.publish` runs `health.assess` and hands the one result to every surface. It also owns what
happens when the state dir cannot be written (a full disk): the agent keeps serving, reports `degraded`,
logs the condition once a minute instead of once per attempt, and when space returns writes a `gap` entry
to the audit log saying which entries were lost.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from grayagent.fsutil import RENDERED_MODE, atomic_write
from grayagent.logsetup import Throttle
from grayagent.runtime.audit import AuditLog
from grayagent.runtime.health import Health, Observation, State, assess
from grayagent.runtime.observe import AgentMetrics
from grayagent.runtime.state import StateDir
from grayagent.stores.base import FleetStatus, utc_now

log = structlog.get_logger("grayagent.runtime.agent")

PROBE_SIZE = 4096  # a write that needs a fresh block: small appends can still fit in a full disk's last page


@dataclass
class AgentStatus:
    host: str
    target: str
    state: str = State.STARTING.value
    reason: str = ""
    healthy: bool = False          # state == "healthy"
    applied_version: int | None = None
    applied_digest: str | None = None
    desired_version: int | None = None
    store_reachable: bool = False
    store_error: str | None = None  # why the last store read failed; None while it answers
    last_error: str | None = None
    serving_from_cache: bool = False
    pinned: int | None = None
    state_dir_error: str | None = None
    applies: int = 0
    failures: int = 0
    updated: str = field(default_factory=utc_now)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class StatusReporter:
    """Sends the newest status to a store that keeps fleet status, from its own thread.

    The main loop must never wait on the store: with etcd down a report could block for the whole retry
    budget. Only the latest status matters, so older unsent ones are dropped; it re-reports periodically so
    an entry lost with an expired lease comes back.
    """

    def __init__(self, fleet: FleetStatus, host: str, every: float = 10.0,
                 extra: Callable[[], dict[str, Any]] | None = None) -> None:
        self.fleet = fleet
        self.host = host
        self.every = every
        self.extra = extra  # read at send time: fresh figures (traffic counters) on every report
        self._latest: dict[str, Any] | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-reporter", daemon=True)
        self._throttle = Throttle()

    def start(self) -> StatusReporter:
        self._thread.start()
        return self

    def submit(self, status: AgentStatus) -> None:
        self._latest = status.as_dict()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.every)
            self._wake.clear()
            latest = self._latest
            if latest is None or self._stop.is_set():
                continue
            try:
                self.fleet.report(self.host, {**latest, **self.extra()} if self.extra is not None else latest)
                self._throttle.reset("report")
            except Exception as exc:  # reporting must never stop the agent
                self._throttle(log.warning, "status report failed", key="report", error=str(exc))

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)


class StatusKeeper:
    """One status, one assessment, every surface; and the agent's writes to its state dir."""

    def __init__(self, state: StateDir, status: AgentStatus, metrics: AgentMetrics,
                 reporter: StatusReporter | None = None,
                 on_status: Callable[[AgentStatus], None] | None = None) -> None:
        self.state = state
        self.status = status
        self.metrics = metrics
        self.reporter = reporter
        self.on_status = on_status
        self.audit_log = AuditLog(state.root)
        self.throttle = Throttle()
        self._lost: list[dict[str, str]] = []   # audit entries that could not be written: event and time
        self._written: dict[str, Any] | None = None
        self._lock = threading.Lock()

    @property
    def health(self) -> Health:
        return Health(State(self.status.state), self.status.reason)

    # ------------------------------------------------------------------ writes to the state dir

    def write_failed(self, what: str, exc: OSError) -> None:
        """A write to the state dir failed: degraded until a later write succeeds; logged once a minute."""
        self.status.state_dir_error = f"{what}: {exc.strerror or exc}"
        self.throttle(log.error, "state dir not writable; the proxy keeps serving", key="state-dir",
                      what=what, error=str(exc), state_dir=str(self.state.root))

    def audit(self, event: str, **fields: Any) -> None:
        """Audit, but never let a failing disk stop the agent: the proxy keeps serving either way.
        A lost entry is remembered, and the gap is recorded in the log once it can be written again."""
        with self._lock:
            if self._lost and not (self._space_back() and self._write_gap()):
                self._lost.append({"event": event, "time": utc_now()})
                return
            try:
                self.audit_log.append(event, **fields)
            except OSError as exc:
                self._lost.append({"event": event, "time": utc_now()})
                self.write_failed("audit", exc)

    def _write_gap(self) -> bool:
        """Record the entries a full disk swallowed (event names and times only: their details are gone)."""
        try:
            # A write_failed gap: `grayagent audit verify` reports it until an operator acknowledges it.
            self.audit_log.record_gap("write_failed", cause="state dir not writable", lost=len(self._lost),
                                      lost_events=[e["event"] for e in self._lost], since=self._lost[0]["time"],
                                      until=self._lost[-1]["time"], error=self.status.state_dir_error)
        except OSError:
            return False
        log.warning("audit entries were lost while the state dir was not writable; gap recorded",
                    lost=len(self._lost))
        self._lost.clear()
        return True

    def _space_back(self) -> bool:
        """Whether a write that needs a fresh block succeeds: then the gap entry and its head fit too."""
        probe = self.state.tmp_dir() / "write-probe"
        try:
            atomic_write(probe, b"\0" * PROBE_SIZE)
        except OSError:
            return False
        probe.unlink(missing_ok=True)
        return True

    def _recover(self) -> None:
        """After a failed write, find out whether space came back; then write the gap marker first."""
        with self._lock:
            if not self._space_back() or (self._lost and not self._write_gap()):
                return
        self.status.state_dir_error = None
        self.throttle.reset("state-dir")
        log.info("state dir writable again", state_dir=str(self.state.root))

    # ------------------------------------------------------------------ publishing

    def publish(self, observation: Observation) -> Health:
        """Assess, and show the result everywhere. status.json and the fleet report are rewritten only when
        something changed, so neither an idle pass nor a health probe costs a disk write."""
        if self.status.state_dir_error is not None or self._lost:
            self._recover()
        self._assess(observation)
        current = {k: v for k, v in self.status.as_dict().items() if k != "updated"}
        if current != self._written:
            self.status.updated = utc_now()
            try:
                atomic_write(self.state.status, json.dumps(self.status.as_dict(), indent=1).encode(),
                             RENDERED_MODE)
                self._written = current
            except OSError as exc:
                self.write_failed("status", exc)
                self._assess(observation)
            if self.reporter is not None:
                self.reporter.submit(self.status)
            if self.on_status is not None:
                try:
                    self.on_status(self.status)
                except Exception as exc:
                    log.warning("status callback failed", error=str(exc))
        return self.health

    def _assess(self, observation: Observation) -> None:
        health = assess(dataclasses.replace(observation, state_dir_error=self.status.state_dir_error))
        self.status.state, self.status.reason, self.status.healthy = health.state.value, health.reason, \
            health.healthy
        self.metrics.record_state(self.status.applied_version, self.status.desired_version,
                                  self.status.store_reachable, health.state.value)
