"""Running a rollout's analysis when it is due, and keeping its result in the record."""

from __future__ import annotations

from grayagent.errors import GrayagentError
from grayagent.rollout.analysis import judge
from grayagent.rollout.record import RolloutRecord
from grayagent.rollout.sources import MetricsSource
from grayagent.rules.model import Rollout


def analyse(rec: RolloutRecord, spec: Rollout, source: MetricsSource, now: float) -> bool:
    """Run the analysis when its interval has passed; False once failures exceed the limit."""
    if spec.analysis is None or (rec.weight <= 0 and not rec.audiences):  # the canary serves no one
        return True
    last = rec.last_analysis_at
    if last is not None and 0 <= now - last < spec.analysis.interval:  # a clock that went back: due
        return True
    rec.last_analysis_at = now
    try:
        measured, rec.window = source.measure(rec.service, (spec.canary, spec.stable), rec.window, spec.analysis)
    except GrayagentError as exc:
        measured = None
        rec.add_analysis({"time": now, "result": "inconclusive", "reasons": [str(exc)]})
    if measured is None:
        return True
    canary, stable = measured
    verdict = judge(spec.analysis, canary, stable)
    rec.add_analysis({"time": now, "step": rec.step, "weight": rec.weight, "result": verdict.result,
                      "reasons": list(verdict.reasons), "canary": canary.as_dict(), "stable": stable.as_dict()})
    if verdict.result == "fail":
        rec.failures += 1
        rec.event(now, f"rollout {rec.service}: analysis failed ({rec.failures}/{spec.failure_limit + 1}): "
                       + "; ".join(verdict.reasons))
    return rec.failures <= spec.failure_limit
