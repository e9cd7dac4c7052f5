"""The agent: watch the store, coalesce bursts, render, apply, audit, report status.

Three stages stay apart, as in consul-template: the store's watch only wakes the loop; the loop reads the
current version, renders it purely, and hands the files to the target's applier.

Guarantees:
- a document that fails validation is refused and audited, never applied, and never retried (versions are
  immutable); the proxy keeps the last-good config;
- an apply that fails is retried with exponential backoff, never in a hot loop;
- with the store unreachable at start, the cached last-good version is applied and the store retried;
- bursts coalesce: at most one apply per `min_apply_interval`, always of the newest version.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from grayagent.audit import AuditLog
from grayagent.errors import GrayagentError, InvalidDocument
from grayagent.fsutil import RENDERED_MODE, atomic_write
from grayagent.model import parse_document
from grayagent.observe import AgentMetrics
from grayagent.stores.base import FleetStatus, Store, VersionMeta, VersionRecord, digest_of, utc_now
from grayagent.targets.base import ApplyResult, Target
from grayagent.targets.traffic import TrafficCollector, TrafficSampler

log = structlog.get_logger("grayagent.agent")

CACHE_FILE = "last-good.json"
CACHE_DIR = "cache"
CACHE_KEEP = 20
PIN_FILE = "pinned.json"  # written by `grayagent local-revert`: the agent applies nothing from the store
STATUS_FILE = "status.json"
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


@dataclass
class AgentStatus:
    host: str
    target: str
    applied_version: int | None = None
    applied_digest: str | None = None
    desired_version: int | None = None
    healthy: bool = False
    store_reachable: bool = False
    last_error: str | None = None
    serving_from_cache: bool = False
    pinned: int | None = None
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
            except Exception as exc:  # reporting must never stop the agent
                log.warning("status report failed", error=str(exc))

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)


def save_cache(state_dir: Path, record: VersionRecord) -> None:
    """last-good.json for start-up without the store, and cache/<N>.json for a break-glass local revert."""
    entry = json.dumps({**record.meta.as_dict(), "content": record.content.decode("utf-8")},
                       ensure_ascii=False).encode()
    atomic_write(state_dir / CACHE_DIR / f"{record.version:010d}.json", entry, RENDERED_MODE)
    atomic_write(state_dir / CACHE_FILE, entry, RENDERED_MODE)
    for old in sorted((state_dir / CACHE_DIR).glob("*.json"))[:-CACHE_KEEP]:
        old.unlink(missing_ok=True)


def cached_versions(state_dir: Path) -> list[VersionRecord]:
    """The versions this host applied recently, oldest first."""
    out = []
    for path in sorted((state_dir / CACHE_DIR).glob("*.json")):
        record = _read_record(path)
        if record is not None:
            out.append(record)
    return out


def read_pin(state_dir: Path) -> dict[str, Any] | None:
    try:
        pin = json.loads((state_dir / PIN_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    return pin if isinstance(pin, dict) else None


def load_cache(state_dir: Path) -> VersionRecord | None:
    return _read_record(state_dir / CACHE_FILE)


def _read_record(path: Path) -> VersionRecord | None:
    try:
        data = json.loads(path.read_bytes())
        content = str(data.pop("content")).encode("utf-8")
        meta = VersionMeta(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("cache unreadable; ignoring it", path=str(path), error=str(exc))
        return None
    if digest_of(content) != meta.digest:
        log.warning("cache digest mismatch; ignoring it", path=str(path))
        return None
    return VersionRecord(meta, content)


class Agent:
    def __init__(self, store: Store, target: Target, settings: AgentSettings,
                 on_status: Callable[[AgentStatus], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.target = target
        self.settings = settings
        self.clock = clock
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.audit = AuditLog(settings.state_dir)
        self.status = AgentStatus(host=settings.host, target=target.name)
        self.on_status = on_status
        self.metrics = AgentMetrics(target.name)
        # Per-upstream figures from the gateway (nginx: its JSON access log), for the rollout controller.
        self.traffic: TrafficSampler | None = target.traffic
        if self.traffic is not None:
            self.metrics.registry.register(TrafficCollector(self.traffic.counters, target.name))
        self.reporter = StatusReporter(store, settings.host, settings.status_interval, self._traffic_status) \
            if isinstance(store, FleetStatus) else None
        self._wake = threading.Event()
        self._refused: set[tuple[int, str]] = set()
        self._retry_at: dict[tuple[int, str], tuple[float, float]] = {}  # key -> (due, current delay)
        self._store_delay = 0.0
        self._store_retry_at = 0.0
        self._last_apply = -1e9

    def _traffic_status(self) -> dict[str, Any]:
        return {"traffic": self.traffic.snapshot().as_dict()} if self.traffic is not None else {}

    # ------------------------------------------------------------------ watch handler (watch thread)

    def changed(self) -> None:
        self._wake.set()

    def store_state(self, reachable: bool, detail: str = "") -> None:
        if reachable != self.status.store_reachable:
            log.info("store reachable" if reachable else "store unreachable", store=self.store.url, detail=detail)
        self.status.store_reachable = reachable
        self._wake.set()

    # ------------------------------------------------------------------ one pass

    def _publish_status(self) -> None:
        self.status.updated = utc_now()
        self.metrics.record_state(self.status.applied_version, self.status.desired_version,
                                  self.status.store_reachable, self.status.healthy)
        try:
            atomic_write(self.settings.state_dir / STATUS_FILE,
                         json.dumps(self.status.as_dict(), indent=1).encode(), RENDERED_MODE)
        except OSError as exc:
            log.warning("could not write status", error=str(exc))
        if self.reporter is not None:
            self.reporter.submit(self.status)
        if self.on_status is not None:
            try:
                self.on_status(self.status)
            except Exception as exc:
                log.warning("status report failed", error=str(exc))

    def _read_current(self) -> VersionRecord | bool | None:
        """The store's current record; False when the store cannot be read."""
        try:
            record = self.store.current()
        except GrayagentError as exc:
            self._store_failed(str(exc))
            return False
        self._store_delay = 0.0
        self.status.store_reachable = True
        return record

    def _store_failed(self, error: str) -> None:
        self.status.store_reachable = False
        self._store_delay = min(max(self._store_delay * 2, 0.5), self.settings.store_retry_max)
        self._store_retry_at = self.clock() + self._store_delay * random.uniform(0.5, 1.0)
        log.warning("store read failed", store=self.store.url, error=error, retry_in=round(self._store_delay, 2))

    def sync(self) -> bool:
        """Bring the proxy to the store's current version (or the cache if the store is down). True if healthy."""
        pin = read_pin(self.settings.state_dir)
        if pin is not None:
            # Break-glass: an operator pinned a cached version locally; the store must not undo it.
            self.status.pinned = int(pin.get("version", 0))
            # The local revert put the pinned version live, so that is what this host now serves.
            self.status.applied_version, self.status.applied_digest = self.status.pinned, pin.get("digest")
            self.status.healthy = self.target.live_version() == (self.status.pinned, pin.get("digest"))
            self.status.last_error = None if self.status.healthy else "pinned version is not live"
            self._publish_status()
            return self.status.healthy
        self.status.pinned = None
        record = self._read_current()
        if record is False or record is None:
            # Store down, or empty (a wiped directory): keep serving, from the cache if nothing is applied yet.
            if self.status.applied_version is None:
                cached = load_cache(self.settings.state_dir)
                if cached is not None:
                    self.status.serving_from_cache = True
                    self._apply(cached, source="cache")
            healthy = self.status.last_error is None and (
                self.status.applied_version is not None or record is None)
            self.status.healthy = healthy
            self._publish_status()
            return healthy
        assert isinstance(record, VersionRecord)
        self.status.desired_version = record.version
        key = (record.version, record.meta.digest)
        # Retries only ever matter for the version the store wants now; stale ones must not keep timers due.
        self._retry_at = {k: v for k, v in self._retry_at.items() if k == key}
        applied = (self.status.applied_version, self.status.applied_digest)
        drifted = key == applied and self.status.last_error is None and self._drifted(key)
        if drifted:
            log.warning("proxy no longer serves the applied version; applying it again", version=record.version)
        if key == applied and self.status.last_error is None and not drifted:
            self.status.serving_from_cache = False
            self.status.healthy = True
        elif key in self._refused or (key in self._retry_at and self._retry_at[key][0] > self.clock()):
            pass
        else:
            # "drift": the proxy lost a version already applied; the audit tells a repair from a new version.
            self._apply(record, source="drift" if drifted else "store")
        self._publish_status()
        return self.status.healthy

    def _drifted(self, key: tuple[int, str]) -> bool:
        """The proxy lost what was applied (nginx dynamic mode after a restart holds no data): one loopback GET
        per sync finds out, so the version is applied again before the agent reports healthy. Not right after
        an apply (nginx's old workers still answer for a moment after a reload), and only when a second look
        agrees, so a transient failure of the GET costs no reload."""
        if self.clock() - self._last_apply < DRIFT_GRACE or self.target.live_version() == key:
            return False
        time.sleep(0.2)
        return self.target.live_version() != key

    def _apply(self, record: VersionRecord, source: str) -> None:
        version, digest = record.version, record.meta.digest
        key = (version, digest)
        self._last_apply = self.clock()
        base = {"version": version, "digest": digest, "source": source, "target": self.target.name}
        if digest_of(record.content) != digest:
            self._refuse(key, base, "content does not match its digest")
            return
        steps: dict[str, float] = {}
        started = time.perf_counter()
        try:
            release = parse_document(record.content, f"{self.store.url}#{version}")
        except InvalidDocument as exc:
            self._refuse(key, base, "; ".join(str(p) for p in exc.problems[:5]))
            return
        try:
            files = self.target.render(release, version, digest)
        except Exception as exc:  # a renderer bug: the same content would fail again, so refuse it for good
            log.exception("render failed", version=version)
            self._refuse(key, base, f"render failed: {type(exc).__name__}: {exc}")
            return
        steps["render"] = round((time.perf_counter() - started) * 1000, 3)
        try:
            result = self.target.apply(files, version, digest)
        except Exception as exc:  # never let one apply take the agent down; retried with backoff below
            log.exception("apply raised", version=version)
            result = ApplyResult(ok=False, error=f"apply raised {type(exc).__name__}: {exc}")
        steps.update(result.steps_ms)
        self.status.applies += 1
        self.metrics.record_apply("ok" if result.ok else "failed", steps, result.reloaded)
        if result.ok:
            self._retry_at.clear()  # older failures are moot once a newer version applied
            self.status.applied_version, self.status.applied_digest = version, digest
            self.status.last_error = None
            self.status.healthy = True
            # /healthz reads the status directly; keep the gauges in step with it, not one sync behind.
            self.metrics.record_state(version, self.status.desired_version, self.status.store_reachable, True)
            if source in ("store", "drift"):
                self.status.serving_from_cache = False
                try:
                    save_cache(self.settings.state_dir, record)
                except OSError as exc:  # the proxy already serves it; a full disk must not stop the agent
                    log.error("could not cache the applied version", version=version, error=str(exc))
            self._audit("apply", **base, result="ok", steps_ms=steps)
            log.info("applied", version=version, digest=digest[:19], source=source, steps_ms=steps)
            return
        self.status.failures += 1
        self.status.last_error = result.error
        self.status.healthy = False
        _, delay = self._retry_at.get(key, (0.0, self.settings.retry_initial / 2))
        delay = min(delay * 2, self.settings.retry_max)
        self._retry_at[key] = (self.clock() + delay, delay)
        self._audit("apply", **base, result="failed", steps_ms=steps, error=result.error,
                          restored=result.restored, retry_in_s=delay)
        log.error("apply failed; last-good kept", version=version, error=result.error, restored=result.restored,
                  retry_in=delay)

    def _refuse(self, key: tuple[int, str], base: dict[str, Any], error: str) -> None:
        self._refused.add(key)
        self.metrics.record_apply("refused", {}, reloaded=False)
        self.status.last_error = f"version {key[0]} refused: {error}"
        self.status.healthy = False
        self._audit("refuse", **base, result="refused", error=error)
        log.error("version refused; last-good kept", version=key[0], error=error)

    def _audit(self, event: str, **fields: Any) -> None:
        """Audit, but never let a failing disk stop the agent: the proxy keeps serving either way."""
        try:
            self.audit.append(event, **fields)
        except OSError as exc:
            log.error("audit write failed", audit_event=event, error=str(exc))

    def _guarded_sync(self, stop: threading.Event) -> None:
        try:
            self.sync()
        except Exception as exc:  # a bug or an unforeseen OS error: report it, pause, keep serving
            log.exception("sync failed; retrying shortly")
            self.status.last_error = f"sync failed: {type(exc).__name__}: {exc}"
            self.status.healthy = False
            stop.wait(1.0)

    def is_ready(self) -> bool:
        """Serving something known: an applied version (from the store or the cache), or an empty store."""
        return self.status.applied_version is not None or (
            self.status.store_reachable and self.status.desired_version is None and self.status.last_error is None)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """For /healthz: the applied version is known and the proxy itself says it serves it."""
        applied = (self.status.applied_version, self.status.applied_digest)
        detail: dict[str, Any] = {"applied_version": applied[0], "desired_version": self.status.desired_version,
                                  "store_reachable": self.status.store_reachable, "last_error": self.status.last_error}
        if applied[0] is None:
            return False, {**detail, "reason": "no version applied yet"}
        live = self.target.live_version()
        if live != applied:
            return False, {**detail, "reason": f"{self.target.name} does not answer with the applied version",
                           "live": list(live) if live else None}
        return True, detail

    # ------------------------------------------------------------------ loop

    def _next_timer(self) -> float:
        now = self.clock()
        due = [now + self.settings.resync_interval]
        due += [when for when, _ in self._retry_at.values()]
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
        self._audit("start", target=self.target.name, store=self.store.url, host=self.settings.host)
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
            hold = self._last_apply + self.settings.min_apply_interval - self.clock()
            if hold > 0:
                # Inside a burst: wait out the interval, then let the burst's tail land.
                stop.wait(hold + self.settings.settle)
            self._wake.clear()
            self._guarded_sync(stop)
            if ready is not None and self.is_ready():
                ready()
                ready = None
        self._audit("stop", target=self.target.name)
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
                log.warning("watch ended; restarting", error=str(exc), retry_in=delay)
                stop.wait(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.settings.store_retry_max)
