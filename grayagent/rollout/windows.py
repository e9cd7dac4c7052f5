"""Release windows: when a rollout may advance a step. Pure: the clock is passed in (epoch seconds).

The document's times are wall-clock readings in one IANA zone (grayagent/rules/windowspec.py reads them).
They become instants like this (docs/rollout.md, "Release windows"):
- an allow window that opens on day D is the half-open interval [from on D, to on D), or [from on D, to on
  D+1) when it crosses midnight (from > to); `24:00` is the next midnight;
- a freeze is [from, to); a date alone covers its whole day (to the midnight after a `to` date);
- a reading that does not exist (the hour skipped when clocks spring forward) is the instant the clocks jump
  past it;
- a reading that happens twice (the hour repeated when clocks fall back) resolves towards not advancing: an
  allow window opens at the later occurrence and closes at the earlier, a freeze starts at the earlier and
  ends at the later.

The rollout may advance at an instant inside some allow interval and inside no freeze. Everything else about
a rollout (analysis, rollback, abort, maxDuration) ignores the windows.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from grayagent.rollout.record import RolloutRecord
from grayagent.rules.modeldata import ReleaseWindows

Interval = tuple[float, float]  # [start, end) in epoch seconds
# How far `until` looks: an opening that lasts longer than this is reported as open without an end.
LOOKAHEAD = timedelta(days=8)
# How far the next opening is searched for: freezes that run back to back beyond this leave no opening in sight.
SEARCH = timedelta(days=400)
NO_OPENING = f"no opening within {SEARCH.days} days"


def _reading(zone: ZoneInfo, instant: float) -> datetime:
    """What the wall clock in `zone` reads at `instant` (naive)."""
    return datetime.fromtimestamp(instant, zone).replace(tzinfo=None)


def instants(zone: ZoneInfo, local: datetime) -> tuple[float, float]:
    """(earliest, latest) instant at which the clock reads `local`: equal for an ordinary reading, two apart
    by the fold for a repeated one, and both the moment the clocks jump for a skipped one."""
    found = []
    for fold in (0, 1):
        instant = local.replace(tzinfo=zone, fold=fold).timestamp()
        if _reading(zone, instant) == local:
            found.append(instant)
    if found:
        return min(found), max(found)
    # Skipped: the clock reads less than `local` at `low` and more at `high`; the jump is in between, on a
    # whole second (tzdata transitions are).
    a, b = (local.replace(tzinfo=zone, fold=f).timestamp() for f in (0, 1))
    low, high = int(min(a, b)), int(max(a, b))
    while low < high:
        mid = (low + high) // 2
        if _reading(zone, mid) >= local:
            high = mid
        else:
            low = mid + 1
    return float(low), float(low)


def _allow_intervals(spec: ReleaseWindows, zone: ZoneInfo, first: date, last: date) -> list[Interval]:
    """Every allow interval that opens on a day from `first` to `last` (local dates, inclusive)."""
    out = []
    day = first
    while day <= last:
        midnight = datetime(day.year, day.month, day.day)
        for window in spec.allow:
            if day.weekday() not in window.days:
                continue
            close = window.end + (1440 if window.start > window.end else 0)
            start = instants(zone, midnight + timedelta(minutes=window.start))[1]
            end = instants(zone, midnight + timedelta(minutes=close))[0]
            if start < end:
                out.append((start, end))
        day += timedelta(days=1)
    return out


def _freeze_intervals(spec: ReleaseWindows, zone: ZoneInfo) -> list[tuple[Interval, str]]:
    return [((instants(zone, f.start)[0], instants(zone, f.end)[1]), f.name) for f in spec.freeze]


def _union(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _subtract(base: list[Interval], holes: list[Interval]) -> list[Interval]:
    """`base` minus `holes`, both sorted and disjoint."""
    out = []
    for start, end in base:
        for hole_start, hole_end in holes:
            if hole_end <= start or hole_start >= end:
                continue
            if hole_start > start:
                out.append((start, hole_start))
            start = max(start, hole_end)
            if start >= end:
                break
        if start < end:
            out.append((start, end))
    return out


@dataclass(frozen=True, slots=True)
class WindowState:
    open: bool
    reason: str                  # why closed: "outside the allow windows" or "freeze NAME"; "" when open
    next_open: float | None      # closed: when the next step may run (None: no opening found)
    until: float | None          # open: when it closes (None: not within LOOKAHEAD)


def open_intervals(spec: ReleaseWindows, now: float) -> list[Interval]:
    """The instants at which a step may run, from the day before `now` until a week past the freezes that
    follow on from now (a week holds every weekday's windows), and at most SEARCH ahead."""
    zone = ZoneInfo(spec.timezone)
    freezes = _freeze_intervals(spec, zone)
    today = _reading(zone, now).date()
    limit = today + SEARCH
    horizon = today + LOOKAHEAD + timedelta(days=1)
    for (start, end), _ in sorted(freezes):  # only freezes that start before the horizon push it out
        if _reading(zone, start).date() > horizon:
            break
        horizon = max(horizon, min(_reading(zone, end).date(), limit) + LOOKAHEAD + timedelta(days=1))
    allowed = _union(_allow_intervals(spec, zone, today - timedelta(days=1), min(horizon, limit)))
    return _subtract(allowed, _union([interval for interval, _ in freezes]))


def state(spec: ReleaseWindows, now: float) -> WindowState:
    """Whether a step may run at `now`; if not, why and when next; if so, until when."""
    intervals = open_intervals(spec, now)
    index = bisect.bisect_right(intervals, (now, float("inf")))
    if index and intervals[index - 1][0] <= now < intervals[index - 1][1]:
        until = intervals[index - 1][1]
        return WindowState(True, "", None, until if until - now <= LOOKAHEAD.total_seconds() else None)
    zone = ZoneInfo(spec.timezone)
    frozen = [name for (start, end), name in _freeze_intervals(spec, zone) if start <= now < end]
    reason = f"freeze {frozen[0]}" if frozen else "outside the allow windows"
    upcoming = intervals[index][0] if index < len(intervals) else None
    return WindowState(False, reason, upcoming, None)


def is_open(spec: ReleaseWindows | None, now: float) -> bool:
    return spec is None or state(spec, now).open


def describe_instant(spec: ReleaseWindows, instant: float) -> str:
    """'2026-12-03 10:00+08:00 Asia/Shanghai (2026-12-03 02:00 UTC)': in the zone, and in UTC."""
    local = datetime.fromtimestamp(instant, ZoneInfo(spec.timezone))
    utc = datetime.fromtimestamp(instant, UTC)
    offset = local.strftime("%z")
    return (f"{local:%Y-%m-%d %H:%M}{offset[:3]}:{offset[3:]} {spec.timezone} "
            f"({utc:%Y-%m-%d %H:%M} UTC)")


def describe(spec: ReleaseWindows | None, now: float) -> str:
    """One line for status and the pre-flight check."""
    if spec is None:
        return "no release windows: steps may run at any time"
    st = state(spec, now)
    if st.open:
        return "open" + (f" until {describe_instant(spec, st.until)}" if st.until is not None else "")
    when = (f"the next step may run at {describe_instant(spec, st.next_open)}" if st.next_open is not None
            else NO_OPENING)
    return f"closed ({st.reason}); {when}"


def as_json(spec: ReleaseWindows | None, now: float) -> dict[str, object] | None:
    if spec is None:
        return None
    st = state(spec, now)
    return {"timezone": spec.timezone, "open": st.open, "reason": st.reason or None, "next_open": st.next_open,
            "until": st.until, "text": describe(spec, now)}


def held(rec: RolloutRecord, spec: ReleaseWindows | None, now: float) -> bool:
    """True when the windows hold a step that is due at `now`. The record notes "held by window until …" once
    per hold (again only when the step or the next opening changes), not at every tick."""
    if spec is None:
        return False
    st = state(spec, now)
    if st.open:
        rec.held = None
        return False
    when = describe_instant(spec, st.next_open) if st.next_open is not None else NO_OPENING
    note = f"rollout {rec.service}: step {rec.step + 1}/{len(rec.steps)} held by window until {when} ({st.reason})"
    if rec.held != note:
        rec.held = note
        rec.event(now, note)
    return True
