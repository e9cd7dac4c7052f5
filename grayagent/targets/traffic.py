"""Per-upstream traffic figures that a target's gateway produces, for /metrics and the rollout controller.

A target that can count its traffic offers a `TrafficSampler` (Target.traffic): nginx tails its JSON access
log (nginx_access_log), Envoy polls its admin stats (envoy_stats). The agent starts and stops the sampler,
exposes its counters on /metrics and sends `snapshot()` in its fleet status entry, which is all the rollout
controller reads.

Counters are cumulative from the sampler's start; `boot` changes on every start (and when a gateway's own
counters go down), so a reader that computes deltas can tell a restart from a quiet period.
"""

from __future__ import annotations

import bisect
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# Upper bounds in seconds; fine enough below 1 s that a p99 threshold of a few hundred ms can be judged.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                   2.5, 5.0, 10.0)
UPSTREAM_PREFIX = "grayagent."  # targets.layout.upstream_id: grayagent.<service>.<upstream>


@dataclass(frozen=True)
class UpstreamFigures:
    service: str
    upstream: str
    requests: int
    errors_5xx: int
    latency_sum: float
    latency_buckets: tuple[int, ...]  # cumulative, one per bound of the snapshot's latency_le, then +Inf


@dataclass(frozen=True)
class TrafficSnapshot:
    """One sampler's figures at one moment."""

    boot: str
    latency_le: tuple[float, ...]
    upstreams: tuple[UpstreamFigures, ...]

    def as_dict(self) -> dict[str, Any]:
        """The form that goes into the agent's fleet status entry (JSON)."""
        return {
            "boot": self.boot,
            "latency_le": list(self.latency_le),
            "upstreams": {f"{u.service}/{u.upstream}": {"requests": u.requests, "errors_5xx": u.errors_5xx,
                                                        "latency_sum": u.latency_sum,
                                                        "latency_buckets": list(u.latency_buckets)}
                          for u in self.upstreams},
        }


class TrafficSampler(Protocol):
    """What a target offers to count its traffic; the agent starts and stops it."""

    counters: TrafficCounters

    def start(self) -> Any: ...

    def stop(self) -> None: ...

    def snapshot(self) -> TrafficSnapshot: ...


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

    def snapshot(self) -> TrafficSnapshot:
        return TrafficSnapshot(self.boot, self.bounds, tuple(
            UpstreamFigures(svc, up, c.requests, c.errors_5xx, round(c.latency_sum, 6), tuple(c.cumulative()))
            for (svc, up), c in self.items()))


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


class BackgroundSampler:
    """A sampler that fills `counters` from its own thread (`_run`, which returns once `_stop` is set)."""

    thread_name = "traffic-sampler"
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

    def snapshot(self) -> TrafficSnapshot:
        return self.counters.snapshot()
