"""Per-upstream traffic counters built from the gateway itself, for the rollout controller.

nginx: the renderer writes one JSON line per request (see nginx_render.ACCESS_LOG_FORMAT) to a host-chosen
file; `AccessLogTailer` follows that file from its own thread (never the agent's loop) and survives rotation:
it reopens when the path points to a new inode or the file shrank (copytruncate).

The counters are cumulative from the tailer's start; `boot` changes on every start, so a reader that
computes deltas can tell a restart (counters back at 0) from a quiet period.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self

import structlog
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

log = structlog.get_logger("grayagent.traffic")

# Upper bounds in seconds; fine enough below 1 s that a p99 threshold of a few hundred ms can be judged.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                   2.5, 5.0, 10.0)
UPSTREAM_PREFIX = "grayagent."  # targets.layout.upstream_id: grayagent.<service>.<upstream>


@dataclass
class UpstreamCounters:
    requests: int = 0
    errors_5xx: int = 0
    latency_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))  # not cumulative

    def observe(self, status: int, seconds: float) -> None:
        self.requests += 1
        if 500 <= status <= 599:
            self.errors_5xx += 1
        self.latency_sum += seconds
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def cumulative(self) -> list[int]:
        out, total = [], 0
        for count in self.buckets:
            total += count
            out.append(total)
        return out


class TrafficCounters:
    """Thread-safe counters keyed by (service, upstream)."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.boot = uuid.uuid4().hex[:12]
        self.bounds = bounds
        self._lock = threading.Lock()
        self._by_upstream: dict[tuple[str, str], UpstreamCounters] = {}

    def replace(self, totals: dict[tuple[str, str], UpstreamCounters]) -> None:
        """Take totals that a gateway counts itself (Envoy); a counter that went down means it restarted."""
        with self._lock:
            restarted = any(totals.get(k, UpstreamCounters()).requests < v.requests
                            for k, v in self._by_upstream.items())
            if restarted:
                self.boot = uuid.uuid4().hex[:12]
            self._by_upstream = dict(totals)

    def observe(self, service: str, upstream: str, status: int, seconds: float) -> None:
        with self._lock:
            counters = self._by_upstream.get((service, upstream))
            if counters is None:
                counters = self._by_upstream[(service, upstream)] = UpstreamCounters()
            counters.observe(status, seconds)

    def items(self) -> list[tuple[tuple[str, str], UpstreamCounters]]:
        with self._lock:
            return [(k, UpstreamCounters(v.requests, v.errors_5xx, v.latency_sum, list(v.buckets)))
                    for k, v in sorted(self._by_upstream.items())]

    def snapshot(self) -> dict[str, Any]:
        """The form that goes into the agent's fleet status entry (JSON)."""
        return {
            "boot": self.boot,
            "latency_le": list(self.bounds),
            "upstreams": {f"{svc}/{up}": {"requests": c.requests, "errors_5xx": c.errors_5xx,
                                          "latency_sum": round(c.latency_sum, 6), "latency_buckets": c.cumulative()}
                          for (svc, up), c in self.items()},
        }


class TrafficCollector(Collector):
    """Exposes the counters on the agent's /metrics with per-upstream labels."""

    def __init__(self, counters: TrafficCounters, target: str) -> None:
        self.counters = counters
        self.target = target

    def collect(self) -> Iterator[Any]:
        labels = ["target", "service", "upstream"]
        requests = CounterMetricFamily("grayagent_upstream_requests", "Requests the gateway sent to each upstream.",
                                       labels=labels)
        errors = CounterMetricFamily("grayagent_upstream_5xx", "Requests answered with a 5xx status.", labels=labels)
        latency = HistogramMetricFamily("grayagent_upstream_latency_seconds", "Upstream response time.",
                                        labels=labels)
        for (svc, up), c in self.counters.items():
            values = [self.target, svc, up]
            requests.add_metric(values, c.requests)
            errors.add_metric(values, c.errors_5xx)
            bounds = [*(f"{b:g}" for b in self.counters.bounds), "+Inf"]
            latency.add_metric(values, list(zip(bounds, c.cumulative(), strict=True)), c.latency_sum)
        yield requests
        yield errors
        yield latency


def parse_line(line: bytes) -> tuple[str, str, int, float] | None:
    """(service, upstream, status, seconds) from one access log line, or None for lines that are not ours."""
    try:
        entry = json.loads(line)
        proxied = str(entry["u"])
        if not proxied.startswith(UPSTREAM_PREFIX):
            return None
        service, _, upstream = proxied[len(UPSTREAM_PREFIX):].partition(".")
        status = int(entry["st"])
        seconds = _seconds(str(entry.get("urt", "")))
        if seconds is None:
            seconds = float(entry.get("rt", 0))
    except (ValueError, KeyError, TypeError):
        return None
    return (service, upstream, status, seconds) if service and upstream else None


def _seconds(text: str) -> float | None:
    """$upstream_response_time: "0.012", or "0.010, 0.002 : 0.003" after retries (summed), or "-"."""
    total, seen = 0.0, False
    for part in text.replace(":", ",").split(","):
        part = part.strip()
        if part and part != "-":
            try:
                total += float(part)
                seen = True
            except ValueError:
                return None
    return total if seen else None


class _BackgroundSource:
    """A traffic source that fills `counters` from its own thread (`_run`, which returns once `_stop` is set)."""

    thread_name = "traffic-source"
    counters: TrafficCounters

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def snapshot(self) -> dict[str, Any]:
        return self.counters.snapshot()


class AccessLogTailer(_BackgroundSource):
    """Follows one access log file from its own thread and feeds `counters`."""

    thread_name = "access-log-tail"

    def __init__(self, path: Path, counters: TrafficCounters | None = None, poll: float = 0.1) -> None:
        super().__init__()
        self.path = path
        self.counters = counters or TrafficCounters()
        self.poll = poll

    def _feed(self, data: bytes) -> None:
        for line in data.split(b"\n"):
            parsed = parse_line(line) if line.strip() else None
            if parsed is not None:
                self.counters.observe(*parsed)

    def _run(self) -> None:
        fd: int | None = None
        inode = -1
        position = 0
        partial = b""
        first = True
        try:
            while not self._stop.is_set():
                if fd is None:
                    try:
                        fd = os.open(self.path, os.O_RDONLY)
                    except OSError:
                        first = False  # a file that appears later is read from its start
                        self._stop.wait(self.poll)
                        continue
                    st = os.fstat(fd)
                    inode = st.st_ino
                    # Lines written before the agent started belong to no window the controller will ask about.
                    position = st.st_size if first else 0
                    first = False
                    partial = b""
                chunk = os.pread(fd, 1 << 20, position)
                if chunk:
                    position += len(chunk)
                    data = partial + chunk
                    cut = data.rfind(b"\n") + 1
                    self._feed(data[:cut])
                    partial = data[cut:]
                    continue
                try:
                    st = os.stat(self.path)
                    rotated = st.st_ino != inode
                    truncated = not rotated and st.st_size < position
                except OSError:
                    rotated, truncated = True, False
                if rotated or truncated:
                    # Renamed away: the old fd was drained above. Truncated: the rest is gone; start over.
                    os.close(fd)
                    fd = None
                    continue
                self._stop.wait(self.poll)
        except Exception as exc:  # the agent must keep running without figures rather than die
            log.error("access log tailer stopped", path=str(self.path), error=str(exc))
        finally:
            if fd is not None:
                os.close(fd)


ENVOY_STATS_FILTER = r"^cluster\.grayagent\.[^.]+\.[^.]+\.(upstream_rq_total|upstream_rq_5xx|upstream_rq_time)$"
ENVOY_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000,
                    1800000, 3600000)  # Envoy's default histogram buckets


def envoy_totals(body: Any) -> dict[tuple[str, str], UpstreamCounters]:
    """Per-upstream totals from Envoy's /stats?format=json&histogram_buckets=cumulative.

    Counters are live; histograms change only at Envoy's stats flush (stats_flush_interval, 5 s by default),
    so latency lags the request counts by up to that much.
    """
    totals: dict[tuple[str, str], UpstreamCounters] = {}

    def of(name: str, suffix: str) -> UpstreamCounters | None:
        parts = name.removeprefix("cluster.").removesuffix("." + suffix).split(".")
        if len(parts) != 3 or parts[0] + "." != UPSTREAM_PREFIX:  # grayagent.<service>.<upstream>
            return None
        return totals.setdefault((parts[1], parts[2]), UpstreamCounters())

    for stat in body.get("stats", []):
        if "histograms" in stat:
            for hist in stat["histograms"] if isinstance(stat["histograms"], list) else []:
                counters = of(str(hist.get("name", "")), "upstream_rq_time")
                buckets = hist.get("buckets", [])
                if counters is None or len(buckets) != len(ENVOY_BUCKETS_MS):
                    continue
                cumulative = [int(b["cumulative"]) for b in buckets]
                counters.buckets = [c - p for c, p in zip(cumulative, [0, *cumulative[:-1]], strict=True)] + [0]
            continue
        name, value = str(stat.get("name", "")), int(stat.get("value", 0))
        for suffix in ("upstream_rq_total", "upstream_rq_5xx"):
            if name.endswith("." + suffix):
                counters = of(name, suffix)
                if counters is not None:
                    if suffix == "upstream_rq_total":
                        counters.requests = value
                    else:
                        counters.errors_5xx = value
    return totals


class EnvoyStatsPoller(_BackgroundSource):
    """Reads per-cluster stats from Envoy's admin endpoint every `every` seconds, from its own thread."""

    thread_name = "envoy-stats"

    def __init__(self, admin_url: str, every: float = 1.0) -> None:
        super().__init__()
        self.url = (f"{admin_url.rstrip('/')}/stats?format=json&histogram_buckets=cumulative&filter="
                    + urllib.parse.quote(ENVOY_STATS_FILTER))
        self.every = every
        self.counters = TrafficCounters(tuple(b / 1000 for b in ENVOY_BUCKETS_MS))

    def poll_once(self) -> None:
        with urllib.request.urlopen(self.url, timeout=2) as response:  # noqa: S310 - the admin URL we were given
            self.counters.replace(envoy_totals(json.loads(response.read())))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.poll_once()
            except (OSError, ValueError) as exc:  # Envoy restarting: keep the last figures, try again
                log.debug("envoy stats poll failed", error=str(exc))



class TrafficSource(Protocol):
    """What an agent runs beside its target to count traffic (AccessLogTailer; Envoy stats could be another)."""

    counters: TrafficCounters

    def start(self) -> Any: ...

    def stop(self) -> None: ...

    def snapshot(self) -> dict[str, Any]: ...
