"""A rollout's `windows` section: from schema-valid data to ReleaseWindows, with the checks the schema cannot
express (the zone exists in the IANA database, dates exist, a freeze ends after it starts).

The meaning of the times (instants, DST) is grayagent/rollout/windows.py's; this only reads them.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from grayagent.rules.modeldata import AllowWindow, Freeze, ReleaseWindows

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

Report = Callable[[list[str | int], str], None]


def load_zone(name: str) -> zoneinfo.ZoneInfo | None:
    """The IANA zone, or None when the name is not one (also for path-like names zoneinfo refuses)."""
    if name.lower() in ("local", "localtime"):
        return None  # never the host's implicit zone
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return None


def minutes(text: str) -> int:
    """'HH:MM' (schema-checked) as minutes after midnight; '24:00' is 1440."""
    hours, mins = text.split(":")
    return int(hours) * 60 + int(mins)


def freeze_bound(text: str, end: bool) -> datetime:
    """A freeze's `from`/`to` as a naive wall-clock datetime. A date alone is a whole day: `from` starts at its
    midnight, `to` ends at the midnight after it (so the day is included). ValueError for a date that does not
    exist (2026-02-30)."""
    if "T" in text:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M")
    day = datetime.strptime(text, "%Y-%m-%d")
    return day + timedelta(days=1) if end else day


def parse_windows(raw: dict[str, Any], path: list[str | int], problem: Report) -> ReleaseWindows:
    """The model of a schema-valid `windows` section; each problem reported with its field's path."""
    zone = raw["timezone"]
    if load_zone(zone) is None:
        problem([*path, "timezone"], f"{zone!r} is not an IANA time zone (e.g. Asia/Shanghai, Europe/Berlin, UTC)")
    allow: list[AllowWindow] = []
    for i, window in enumerate(raw["allow"]):
        start, end = minutes(window["from"]), minutes(window["to"])
        if start == end:
            problem([*path, "allow", i, "to"], "equals from: an empty window; for a whole day write "
                                               "from: \"00:00\", to: \"24:00\"")
        days = tuple(sorted(DAYS.index(d) for d in window.get("days", DAYS)))
        allow.append(AllowWindow(days, start, end))
    freezes: list[Freeze] = []
    for i, freeze in enumerate(raw.get("freeze", [])):
        bounds: list[datetime] = []
        for key in ("from", "to"):
            try:
                bounds.append(freeze_bound(freeze[key], end=key == "to"))
            except (ValueError, OverflowError):  # 2026-02-30; 9999-12-31 as `to` ends past the calendar
                problem([*path, "freeze", i, key], f"{freeze[key]!r} is not a date that exists")
        if len(bounds) == 2:
            if bounds[1] <= bounds[0]:
                problem([*path, "freeze", i, "to"], f"{freeze['to']!r} is not after from {freeze['from']!r}")
            freezes.append(Freeze(freeze["name"], bounds[0], bounds[1]))
    return ReleaseWindows(zone, tuple(allow), tuple(freezes))
