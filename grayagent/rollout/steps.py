"""The step state machine: pause and resume requests, routing steps, timed and manual pauses, success.

Pure: it changes the record and says which stage to publish; the controller records and publishes.
A routing step (a weight, an audience, or both) publishes the stage document (grayagent/rollout/document.py).
"""

from __future__ import annotations

from grayagent.rollout.document import Stage, planned_stage, stage_number
from grayagent.rollout.record import RolloutRecord, pct
from grayagent.rollout.windows import held
from grayagent.rules.model import Rollout, RolloutStep


def advance(rec: RolloutRecord, spec: Rollout, current: Stage, now: float) -> tuple[int, str] | None:
    """Move through the steps; (stage, message) when a routing step needs a publish (after the record write).

    `current` is the stage of the current version: the canary's weight and the audience rules it holds.
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
    if step.routing:
        if held(rec, spec.windows, now):
            return None  # outside the release windows (rollout/windows.py)
        # A pending promote is kept for the next pause: it was meant for a gate, not for this step.
        stage = stage_number(spec, index)
        target = planned_stage(spec, stage, current.weight)
        if current != target:
            return stage, f"{label} {step.describe()}"
        # Already there: published before a crash, or by a person.
        rec.weight, rec.audiences = target.weight, list(target.audiences)
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
