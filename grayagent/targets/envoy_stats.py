"""Envoy's traffic figures: per-cluster request, 5xx and latency stats from its admin endpoint, polled by
`EnvoyStatsPoller` from its own thread. Envoy counts them itself, so a restart shows as counters going down.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from typing import Any

import structlog

from grayagent.targets.traffic import UPSTREAM_PREFIX, BackgroundSampler, TrafficCounters, UpstreamCounters

log = structlog.get_logger("grayagent.traffic")

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


class EnvoyStatsPoller(BackgroundSampler):
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
