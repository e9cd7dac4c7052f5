"""Judging a canary: p99 from histogram buckets, the figures of one window, and the verdict (the window
itself, a difference of cumulative counters, is taken in sources.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from grayagent.rules.model import Analysis

# Relative error checks ignore differences below this share: with a healthy stable at 0 %, a single canary
# 5xx must not count as "infinitely worse".
RELATIVE_ERROR_FLOOR = 0.001


@dataclass(frozen=True, slots=True)
class Measurement:
    """One upstream over one window. None: the source could not tell."""

    requests: int | None
    error_rate: float | None
    p99_ms: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Verdict:
    result: str             # "ok", "fail" or "inconclusive"
    reasons: tuple[str, ...]


def quantile(q: float, bounds: list[float], cumulative: list[int]) -> float | None:
    """Prometheus's histogram_quantile: linear within the bucket; the top finite bound for the +Inf bucket."""
    total = cumulative[-1] if cumulative else 0
    if total <= 0:
        return None
    rank = q * total
    for i, count in enumerate(cumulative):
        if count >= rank:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            below = cumulative[i - 1] if i > 0 else 0
            inside = count - below
            return lower + (bounds[i] - lower) * ((rank - below) / inside if inside else 1.0)
    return bounds[-1]


def measurement_from_counters(requests: int, errors: int, bounds: list[float], cumulative: list[int]) -> Measurement:
    seconds = quantile(0.99, bounds, cumulative)
    return Measurement(requests, errors / requests if requests else None,
                       round(seconds * 1000, 3) if seconds is not None else None)


def judge(spec: Analysis, canary: Measurement, stable: Measurement | None) -> Verdict:
    """ok / fail (with every breached threshold) / inconclusive (too few requests, or no data)."""
    needed = max(spec.min_requests, 1)
    if canary.requests is not None and canary.requests < needed:
        return Verdict("inconclusive", (f"canary served {canary.requests} requests; needs {needed}",))
    reasons: list[str] = []
    rate, p99 = canary.error_rate, canary.p99_ms
    if spec.max_error_rate is not None and rate is not None and rate > spec.max_error_rate:
        reasons.append(f"canary 5xx ratio {rate:.4f} > {spec.max_error_rate:g}")
    if spec.max_p99_latency_ms is not None and p99 is not None and p99 > spec.max_p99_latency_ms:
        reasons.append(f"canary p99 {p99:.1f}ms > {spec.max_p99_latency_ms:g}ms")
    comparable = (spec.relative_to_stable and stable is not None
                  and (stable.requests is None or stable.requests >= max(spec.min_requests, 1)))
    if comparable and stable is not None:
        factor = spec.max_error_rate_factor
        if factor is not None and rate is not None and stable.error_rate is not None \
                and rate > factor * stable.error_rate + RELATIVE_ERROR_FLOOR:
            reasons.append(f"canary 5xx ratio {rate:.4f} > {factor:g} x stable's {stable.error_rate:.4f}")
        factor = spec.max_p99_latency_factor
        if factor is not None and p99 is not None and stable.p99_ms is not None and p99 > factor * stable.p99_ms:
            reasons.append(f"canary p99 {p99:.1f}ms > {factor:g} x stable's {stable.p99_ms:.1f}ms")
    if reasons:
        return Verdict("fail", tuple(reasons))
    if rate is None and p99 is None:
        return Verdict("inconclusive", ("no figures for the canary",))
    return Verdict("ok", ())
