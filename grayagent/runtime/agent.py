"""The agent: watch the store, coalesce bursts, render, apply, audit, report status.

Three stages stay apart, as in consul-template: the store's watch only wakes the loop; the loop reads the
current version, renders it purely, and hands the files to the target's applier.

Seams: `Agent` is the loop (watch, coalescing, one pass per wake-up, the drift check); `Applier` renders and
applies one version and keeps the refusals and retry timers; `agentstatus.StatusKeeper` assesses health
(runtime/health.py) and shows it on every surface, and owns the writes to the state dir (runtime/state.py).

Guarantees:
- a document that fails validation is refused and audited, never applied, and never retried (versions are
  immutable); the proxy keeps the last-good config;
- an apply that fails is retried with exponential backoff, never in a hot loop;
- with the store unreachable at start, the cached last-good version is applied and the store retried;
- bursts coalesce: at most one apply per `min_apply_interval`, always of the newest version.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from grayagent.errors import GrayagentError, InvalidDocument
from grayagent.rules.docload import loads_json
from grayagent.rules.model import parse_document, reserved_listen_problems
from grayagent.runtime.agentstatus import AgentStatus, StatusKeeper, StatusReporter
from grayagent.runtime.audit import AuditLog
from grayagent.runtime.cache import load_cache, save_cache
from grayagent.runtime.health import Health, Observation
from grayagent.runtime.observe import AgentMetrics
from grayagent.runtime.state import StateDir
from grayagent.stores.base import FleetStatus, Store, VersionRecord, digest_of
from grayagent.targets.base import ApplyResult, Target
from grayagent.targets.traffic import TrafficCollector, TrafficSampler

log = structlog.get_logger("grayagent.runtime.agent")

DRIFT_GRACE = 2.0  # seconds after an apply before the proxy's live version is compared with it


@dataclass
class AgentSettings:
    state_dir: Path
    min_apply_interval: float = 1.0   # coalescing: bursts become one apply per interval
    settle: float = 0.02              # let the tail of a burst land before reading current
    resync_interval: float = 30.0     # re-read current even without a watch event
    retry_initial: float = 2.0
    retry_max: float = 300.0
    store_retry_max: float = 30.0
    status_interval: float = 10.0     # fleet status re-report period; it carries the traffic counters too
    host: str = field(default_factory=socket.gethostname)
    # The agent's own addresses (flag -> "host:port": its status listen, nginx's verify listen): a document
    # that would listen on one is refused like any bad document. Only the agent knows them, not the document.
    reserved_listens: dict[str, str] = field(default_factory=dict)


def read_pin(state_dir: Path) -> dict[str, Any] | None:
    """The break-glass pin written by `grayagent local-revert`: while it exists the store is not followed."""
    try:
        pin = loads_json(StateDir(state_dir).pin.read_bytes())
    except (OSError, ValueError):
        return None
    return pin if isinstance(pin, dict) else None


@dataclass(frozen=True)
class CurrentRead:
    """What one read of the store's current version found: `reachable` False when the store could not be
    read; `record` None when it answered with nothing published."""

    reachable: bool
    record: VersionRecord | None = None


_UNREAD = object()  # no live reading taken in this pass yet


class Agent:
    """The loop: watch wakes it, bursts coalesce, each pass (`sync`) follows the pin or the store.
    Applying is `Applier`'s job; status, health and state-dir writes are `StatusKeeper`'s."""

    def __init__(self, store: Store, target: Target, settings: AgentSettings,
                 on_status: Callable[[AgentStatus], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.target = target
        self.settings = settings
        self.clock = clock
        self.state = StateDir(settings.state_dir).ensure()  # cleaned by the caller (agentrun) before targets start
        self.status = AgentStatus(host=settings.host, target=target.name)
        self.metrics = AgentMetrics(target.name)
        # Per-upstream figures from the gateway (nginx: its JSON access log), for the rollout controller.
        self.traffic: TrafficSampler | None = target.traffic
        if self.traffic is not None:
            self.metrics.registry.register(TrafficCollector(self.traffic.counters, target.name))
        reporter = StatusReporter(store, settings.host, settings.status_interval, self._traffic_status) \
            if isinstance(store, FleetStatus) else None
        self.keeper = StatusKeeper(self.state, self.status, self.metrics, reporter, on_status)
        self.applier = Applier(self)
        self._wake = threading.Event()
        self._sync_lock = threading.Lock()  # a pass and a health probe (status server thread) take turns
        self._synced = False
        self._live: object = _UNREAD
        self._store_delay = 0.0
        self._store_retry_at = 0.0

    @property
    def audit(self) -> AuditLog:
        return self.keeper.audit_log

    @property
    def reporter(self) -> StatusReporter | None:
        return self.keeper.reporter

    def _traffic_status(self) -> dict[str, Any]:
        return {"traffic": self.traffic.snapshot().as_dict()} if self.traffic is not None else {}

    # ------------------------------------------------------------------ watch handler (watch thread)

    def changed(self) -> None:
        self._wake.set()

    def store_state(self, reachable: bool, detail: str = "") -> None:
        if reachable != self.status.store_reachable:
            log.info("store reachable" if reachable else "store unreachable", store=self.store.url, detail=detail)
        self.status.store_reachable = reachable
        self.status.store_error = None if reachable else (detail or None)
        self._wake.set()

    # ------------------------------------------------------------------ one pass

    def _read_current(self) -> CurrentRead:
        try:
            record = self.store.current()
        except GrayagentError as exc:
            self._store_failed(str(exc))
            return CurrentRead(reachable=False)
        if self._store_delay:
            self.keeper.throttle.reset("store-read")
        self._store_delay = 0.0
        self.status.store_reachable = True
        self.status.store_error = None
        return CurrentRead(reachable=True, record=record)

    def _store_failed(self, error: str) -> None:
        self.status.store_reachable = False
        self.status.store_error = error
        self._store_delay = min(max(self._store_delay * 2, 0.5), self.settings.store_retry_max)
        self._store_retry_at = self.clock() + self._store_delay * random.uniform(0.5, 1.0)
        self.keeper.throttle(log.warning, "store read failed", key="store-read", store=self.store.url,
                             error=error, retry_in=round(self._store_delay, 2))

    def sync(self) -> bool:
        """Bring the proxy to the store's current version (or the cache if the store is down). True if healthy."""
        with self._sync_lock:
            self._live = _UNREAD
            pin = read_pin(self.state.root)
            if pin is not None:
                # Break-glass: an operator pinned a cached version locally; the store must not undo it.
                self.status.pinned = int(pin.get("version", 0))
                # The local revert put the pinned version live, so that is what this host now serves.
                self.status.applied_version, self.status.applied_digest = self.status.pinned, pin.get("digest")
                self.status.last_error = None
            else:
                self.status.pinned = None
                self._follow_store()
            self._synced = True
            # status.json and the fleet entry are rewritten only when something changed: an idle agent's
            # passes cost no disk write (the reporter re-sends the entry on its own timer).
            return self._publish().healthy

    def _follow_store(self) -> None:
        read = self._read_current()
        if read.record is None:
            # Store down, or empty (a wiped directory): keep serving, from the cache if nothing is applied yet.
            if read.reachable:
                self.status.desired_version = None
            if self.status.applied_version is None:
                cached = load_cache(self.state.root, self.store.url)
                if cached is not None:
                    self.status.serving_from_cache = True
                    self.applier.apply(cached, source="cache")
            return
        record = read.record
        self.status.desired_version = record.version
        key = (record.version, record.meta.digest)
        applied = (self.status.applied_version, self.status.applied_digest)
        drifted = key == applied and self._drifted(key)
        if key == applied and not drifted:
            # In step. An error left is moot: it was about another version, or a drift repair that the proxy
            # no longer needs (nginx came back with the applied version).
            self.status.serving_from_cache = False
            self.status.last_error = None
            self.applier.forget(key)
            return
        if not self.applier.due(key):  # refused for good, or its retry is not due yet
            return
        if drifted:
            log.warning("proxy no longer serves the applied version; applying it again", version=record.version)
        # "drift": the proxy lost a version already applied; the audit tells a repair from a new version.
        self.applier.apply(record, source="drift" if drifted else "store")

    def _drifted(self, key: tuple[int, str]) -> bool:
        """The proxy lost what was applied (nginx dynamic mode after a restart holds no data): one loopback GET
        per sync finds out, so the version is applied again before the agent reports healthy. Not right after
        an apply (nginx's old workers still answer for a moment after a reload), and only when a second look
        agrees, so a transient failure of the GET costs no reload."""
        if self._recently_applied() or self._live_reading() == key:
            return False
        time.sleep(0.2)
        self._live = self.target.live_version()
        return self._live != key

    def _recently_applied(self) -> bool:
        return self.clock() - self.applier.last_success < DRIFT_GRACE

    def _live_reading(self) -> tuple[int, str] | None:
        """What the proxy serves, read once per pass. Right after an apply the apply's own verify is the
        answer: nginx's old workers may still give the previous version for a moment."""
        if self._live is _UNREAD:
            applied = self._applied()
            self._live = applied if applied is not None and self._recently_applied() else self.target.live_version()
        return self._live  # type: ignore[return-value]

    def _applied(self) -> tuple[int, str] | None:
        version, digest = self.status.applied_version, self.status.applied_digest
        return (version, digest) if version is not None and digest is not None else None

    def _publish(self) -> Health:
        """Assess health from this pass's observations, and show it on every surface."""
        pinned = (self.status.pinned, self.status.applied_digest or "") if self.status.pinned is not None else None
        live = self._live_reading() if self._synced and (pinned or self._applied()) else None
        return self.keeper.publish(Observation(
            target=self.target.name, synced=self._synced, applied=self._applied(), live=live,
            desired=self.status.desired_version, store_reachable=self.status.store_reachable,
            store_error=self.status.store_error, last_error=self.status.last_error, pinned=pinned,
            serving_from_cache=self.status.serving_from_cache))

    def _guarded_sync(self, stop: threading.Event) -> None:
        try:
            self.sync()
        except Exception as exc:  # a bug or an unforeseen OS error: report it, pause, keep serving
            log.exception("sync failed; retrying shortly")
            self.status.last_error = f"sync failed: {type(exc).__name__}: {exc}"
            with contextlib.suppress(Exception), self._sync_lock:
                self._publish()
            stop.wait(1.0)

    def is_ready(self) -> bool:
        """Serving something known: an applied version (from the store or the cache), or an empty store."""
        return self.status.applied_version is not None or (
            self.status.store_reachable and self.status.desired_version is None and self.status.last_error is None)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """For /healthz and /status: assess again with a fresh look at the proxy, unless a pass is running
        (then its result stands). The same assessment feeds the status, the metrics and the fleet report."""
        if self._sync_lock.acquire(blocking=False):
            try:
                if self._synced:
                    self._live = _UNREAD
                    self._publish()
            finally:
                self._sync_lock.release()
        status = self.status
        return status.healthy, {"state": status.state, "reason": status.reason, "healthy": status.healthy,
                                "applied_version": status.applied_version,
                                "desired_version": status.desired_version, "pinned": status.pinned,
                                "store_reachable": status.store_reachable, "last_error": status.last_error}

    # ------------------------------------------------------------------ loop

    def _next_timer(self) -> float:
        now = self.clock()
        due = [now + self.settings.resync_interval, *self.applier.retry_times()]
        if not self.status.store_reachable and self._store_retry_at:
            due.append(self._store_retry_at)
        return max(0.0, min(due) - now)

    def run(self, stop: threading.Event, ready: Callable[[], None] | None = None,
            heartbeat: Callable[[], None] | None = None) -> None:
        watcher = threading.Thread(target=self._watch, args=(stop,), name="store-watch", daemon=True)
        watcher.start()
        if self.reporter is not None:
            self.reporter.start()
        if self.traffic is not None:
            self.traffic.start()
        self.keeper.audit("start", target=self.target.name, store=self.store.url, host=self.settings.host)
        self._guarded_sync(stop)
        if ready is not None and self.is_ready():
            ready()
            ready = None
        while not stop.is_set():
            self._wake.wait(timeout=min(self._next_timer(), 5.0))
            if heartbeat is not None:
                heartbeat()
            if stop.is_set():
                break
            # Coalesce: one apply per interval, of whatever is newest once the burst settles.
            hold = self.applier.last_apply + self.settings.min_apply_interval - self.clock()
            if hold > 0:
                # Inside a burst: wait out the interval, then let the burst's tail land.
                stop.wait(hold + self.settings.settle)
            self._wake.clear()
            self._guarded_sync(stop)
            if ready is not None and self.is_ready():
                ready()
                ready = None
        self.keeper.audit("stop", target=self.target.name)
        if self.reporter is not None:
            self.reporter.stop()
        if self.traffic is not None:
            self.traffic.stop()
        watcher.join(timeout=5)

    def _watch(self, stop: threading.Event) -> None:
        delay = 0.5
        while not stop.is_set():
            try:
                self.store.watch(self, stop)
                return
            except Exception as exc:
                self.store_state(False, str(exc))
                self.keeper.throttle(log.warning, "watch ended; restarting", key="watch", error=str(exc),
                                     retry_in=delay)
                stop.wait(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.settings.store_retry_max)


class Applier:
    """Render and apply one version; refusals are remembered for good, failures retried with backoff."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.status = agent.status
        self.refused: set[tuple[int, str]] = set()
        self.retry_at: dict[tuple[int, str], tuple[float, float]] = {}  # key -> (due, current delay)
        self.last_apply = -1e9    # the last attempt: coalescing counts from here
        self.last_success = -1e9  # the last verified apply: the drift check trusts it for DRIFT_GRACE

    def forget(self, key: tuple[int, str]) -> None:
        self.retry_at.pop(key, None)

    def retry_times(self) -> list[float]:
        return [when for when, _ in self.retry_at.values()]

    def due(self, key: tuple[int, str]) -> bool:
        """Whether the store's current version `key` should be tried now."""
        # Retries only ever matter for the version the store wants now; stale ones must not keep timers due.
        self.retry_at = {k: v for k, v in self.retry_at.items() if k == key}
        return key not in self.refused and not (key in self.retry_at and self.retry_at[key][0] > self.agent.clock())

    def apply(self, record: VersionRecord, source: str) -> None:
        agent, target = self.agent, self.agent.target
        version, digest = record.version, record.meta.digest
        key = (version, digest)
        self.last_apply = agent.clock()
        base = {"version": version, "digest": digest, "source": source, "target": target.name}
        if digest_of(record.content) != digest:
            self._refuse(key, base, "content does not match its digest")
            return
        steps: dict[str, float] = {}
        started = time.perf_counter()
        try:
            where = f"{agent.store.url}#{version}"
            release = parse_document(record.content, where)
            if taken := reserved_listen_problems(release, where, agent.settings.reserved_listens):
                raise InvalidDocument(taken)
        except InvalidDocument as exc:
            self._refuse(key, base, "; ".join(str(p) for p in exc.problems[:5]))
            return
        try:
            files = target.render(release, version, digest)
        except Exception as exc:  # a renderer bug: the same content would fail again, so refuse it for good
            log.exception("render failed", version=version)
            self._refuse(key, base, f"render failed: {type(exc).__name__}: {exc}")
            return
        steps["render"] = round((time.perf_counter() - started) * 1000, 3)
        try:
            result = target.apply(files, version, digest)
        except Exception as exc:  # never let one apply take the agent down; retried with backoff below
            log.exception("apply raised", version=version)
            result = ApplyResult(ok=False, error=f"apply raised {type(exc).__name__}: {exc}")
        steps.update(result.steps_ms)
        self.status.applies += 1
        agent.metrics.record_apply("ok" if result.ok else "failed", steps, result.reloaded)
        if result.ok:
            self.last_success = agent.clock()
            self.retry_at.clear()  # older failures are moot once a newer version applied
            self.status.applied_version, self.status.applied_digest = version, digest
            self.status.last_error = None
            agent._publish()  # at once: whoever saw the proxy change must find the status changed too
            if source in ("store", "drift"):
                self.status.serving_from_cache = False
                try:
                    save_cache(agent.state.root, agent.store.url, record)
                except OSError as exc:  # the proxy already serves it; a full disk must not stop the agent
                    agent.keeper.write_failed("cache", exc)
            agent.keeper.audit("apply", **base, result="ok", steps_ms=steps)
            log.info("applied", version=version, digest=digest[:19], source=source, steps_ms=steps)
            return
        self.status.failures += 1
        self.status.healthy = False  # before last_error: a reader polling for the error sees both
        self.status.last_error = result.error
        _, delay = self.retry_at.get(key, (0.0, agent.settings.retry_initial / 2))
        delay = min(delay * 2, agent.settings.retry_max)
        self.retry_at[key] = (agent.clock() + delay, delay)
        agent.keeper.audit("apply", **base, result="failed", steps_ms=steps, error=result.error,
                           restored=result.restored, retry_in_s=delay)
        log.error("apply failed; last-good kept", version=version, error=result.error, restored=result.restored,
                  retry_in=delay)

    def _refuse(self, key: tuple[int, str], base: dict[str, Any], error: str) -> None:
        self.refused.add(key)
        self.agent.metrics.record_apply("refused", {}, reloaded=False)
        self.status.healthy = False  # before last_error: a reader polling for the error sees both
        self.status.last_error = f"version {key[0]} refused: {error}"
        self.agent.keeper.audit("refuse", **base, result="refused", error=error)
        log.error("version refused; last-good kept", version=key[0], error=error)
