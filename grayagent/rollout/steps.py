"""The step state machine: pause and resume requests, weight steps, timed and manual pauses, success.

Pure: it changes the record and says which weight to publish; the controller records and publishes.
"""

from __future__ import annotations

from grayagent.rollout.record import RolloutRecord, pct
from grayagent.rollout.windows import held
from grayagent.rules.model import Rollout, RolloutStep


def advance(rec: RolloutRecord, spec: Rollout, current_weight: int, now: float) -> tuple[int, str] | None:
    """Move through the steps; (weight, message) when a weight step needs a publish (after the record write).

    `current_weight` is the canary's weight in the current version.
    """
    service, requests = rec.service, rec.requests
    if requests.get("pause") and not requests.get("promote"):
        if rec.phase != "paused":
            rec.phase = "paused"
            rec.event(now, f"rollout {service}: paused at step {rec.step + 1}/{len(spec.steps)}")
        return None
    if rec.phase == "paused":
        rec.phase = "progressing"
        requests["pause"] = False
        rec.step_started_at = now  # a timed pause restarts after a manual pause
        rec.event(now, f"rollout {service}: resumed")
    index = rec.step
    if index >= len(spec.steps):
        finish(rec, now)
        return None
    step: RolloutStep = spec.steps[index]
    label = f"rollout {service}: step {index + 1}/{len(spec.steps)}"
    if step.weight is not None:
        if held(rec, spec.windows, now):
            return None  # outside the release windows (rollout/windows.py)
        # A pending promote is kept for the next pause: it was meant for a gate, not for this step.
        if current_weight != step.weight:
            return step.weight, f"{label} weight {pct(step.weight)}"
        rec.weight = step.weight  # already there (published before a crash, or by a person)
    elif requests.get("promote"):
        if held(rec, spec.windows, now):
            return None  # a promote outside the windows waits for the next opening
        requests.pop("promote")
        rec.event(now, f"{label} ({step.describe()}) promoted")
    elif step.manual:
        return None  # waiting for `promote`
    else:
        started = rec.step_started_at if rec.step_started_at is not None else now
        if now < started:  # the clock went back: the pause starts over from now
            started = now
        rec.step_started_at = started
        if now - started < (step.pause or 0.0) or held(rec, spec.windows, now):
            return None  # waiting for the pause to run out, or for the release windows
    next_step(rec, spec, now)
    return None


def next_step(rec: RolloutRecord, spec: Rollout, now: float) -> None:
    rec.step += 1
    rec.step_started_at = now
    if rec.step >= len(spec.steps):
        finish(rec, now)


def finish(rec: RolloutRecord, now: float) -> None:
    rec.phase = "succeeded"
    rec.finished_at = now
    rec.event(now, f"rollout {rec.service}: succeeded at canary weight {pct(rec.weight)}")
