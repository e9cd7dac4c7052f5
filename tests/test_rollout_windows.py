"""Release windows: the pure time logic (half-open intervals, midnight, whole-day freezes, DST gaps and folds,
the next opening), the document's `windows` section, and the controller holding only step advances."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from grayagent.rollout import usecases as rollout
from grayagent.rollout import windows
from grayagent.rollout.controller import Controller
from grayagent.rollout.record import RolloutRecord
from grayagent.rules.model import parse_document
from grayagent.rules.modeldata import ReleaseWindows
from grayagent.stores.file import FileStore
from tests.agenthelp import grayagent
from tests.test_rollout_units import Clock, Scripted, doc, problems

SHANGHAI = ZoneInfo("Asia/Shanghai")
BERLIN = ZoneInfo("Europe/Berlin")
WEEKDAYS = ["mon", "tue", "wed", "thu", "fri"]


def spec_of(windows_raw: dict[str, Any]) -> ReleaseWindows:
    ro = parse_document(doc({"canary": "canary", "steps": [{"weight": 10}], "windows": windows_raw}), "d") \
        .services[0].rollout
    assert ro is not None and ro.windows is not None
    return ro.windows


def at(zone: ZoneInfo, *parts: int, fold: int = 0) -> float:
    return datetime(*parts, tzinfo=zone, fold=fold).timestamp()  # type: ignore[misc]


def utc(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()  # type: ignore[misc]


OFFICE = {"timezone": "Asia/Shanghai", "allow": [{"days": WEEKDAYS, "from": "10:00", "to": "16:00"}]}


# ---------------------------------------------------------------------------------------------- the time logic


def test_a_window_is_half_open_and_only_on_its_days() -> None:
    spec = spec_of(OFFICE)
    wed = (2026, 12, 2)
    assert not windows.is_open(spec, at(SHANGHAI, *wed, 9, 59, 59))
    assert windows.is_open(spec, at(SHANGHAI, *wed, 10, 0))
    assert windows.is_open(spec, at(SHANGHAI, *wed, 15, 59, 59))
    assert not windows.is_open(spec, at(SHANGHAI, *wed, 16, 0))
    assert not windows.is_open(spec, at(SHANGHAI, 2026, 12, 5, 12, 0))  # a Saturday
    st = windows.state(spec, at(SHANGHAI, *wed, 12, 0))
    assert st.open and st.until == at(SHANGHAI, *wed, 16, 0) and st.next_open is None


def test_the_next_opening_is_exact_and_shown_in_the_zone_and_in_utc() -> None:
    spec = spec_of(OFFICE)
    friday_evening = at(SHANGHAI, 2026, 12, 4, 16, 0)
    st = windows.state(spec, friday_evening)
    assert not st.open and st.reason == "outside the allow windows"
    assert st.next_open == at(SHANGHAI, 2026, 12, 7, 10, 0) == utc(2026, 12, 7, 2, 0)
    assert windows.describe(spec, friday_evening) == (
        "closed (outside the allow windows); the next step may run at 2026-12-07 10:00+08:00 Asia/Shanghai "
        "(2026-12-07 02:00 UTC)")
    assert windows.describe(None, friday_evening) == "no release windows: steps may run at any time"


def test_a_window_across_midnight_belongs_to_the_day_it_opens() -> None:
    spec = spec_of({"timezone": "Asia/Shanghai", "allow": [{"days": ["fri"], "from": "22:00", "to": "02:00"}]})
    assert windows.is_open(spec, at(SHANGHAI, 2026, 12, 4, 22, 0))       # Friday 22:00
    assert windows.is_open(spec, at(SHANGHAI, 2026, 12, 5, 1, 59, 59))    # Saturday, still Friday's window
    assert not windows.is_open(spec, at(SHANGHAI, 2026, 12, 5, 2, 0))
    assert not windows.is_open(spec, at(SHANGHAI, 2026, 12, 4, 1, 0))     # Friday 01:00: Thursday's, not listed
    st = windows.state(spec, at(SHANGHAI, 2026, 12, 4, 23, 0))
    assert st.until == at(SHANGHAI, 2026, 12, 5, 2, 0)


def test_to_2400_is_the_next_midnight_and_adjacent_windows_join() -> None:
    spec = spec_of({"timezone": "UTC", "allow": [{"from": "20:00", "to": "24:00"}, {"from": "00:00", "to": "06:00"}]})
    assert windows.is_open(spec, utc(2026, 12, 2, 23, 59, 59)) and windows.is_open(spec, utc(2026, 12, 3, 0, 0))
    assert windows.state(spec, utc(2026, 12, 2, 21, 0)).until == utc(2026, 12, 3, 6, 0)
    assert not windows.is_open(spec, utc(2026, 12, 3, 6, 0))


def test_whole_day_freezes_are_inclusive_and_the_next_opening_skips_them() -> None:
    spec = spec_of({**OFFICE, "freeze": [{"name": "singles-day", "from": "2026-11-10", "to": "2026-11-12"}]})
    assert windows.is_open(spec, at(SHANGHAI, 2026, 11, 9, 15, 0))
    for day in (10, 11, 12):  # Tuesday to Thursday, the last day included
        st = windows.state(spec, at(SHANGHAI, 2026, 11, day, 12, 0))
        assert not st.open and st.reason == "freeze singles-day"
        assert st.next_open == at(SHANGHAI, 2026, 11, 13, 10, 0)
    assert windows.is_open(spec, at(SHANGHAI, 2026, 11, 13, 10, 0))
    # Monday afternoon: the window closes at 16:00, the next opening is after the freeze.
    assert windows.state(spec, at(SHANGHAI, 2026, 11, 9, 17, 0)).next_open == at(SHANGHAI, 2026, 11, 13, 10, 0)


def test_a_timed_freeze_is_half_open_and_cuts_a_window_short() -> None:
    spec = spec_of({"timezone": "Asia/Shanghai", "allow": [{"from": "00:00", "to": "24:00"}],
                    "freeze": [{"name": "launch-night", "from": "2026-12-31T20:00", "to": "2027-01-01T02:00"}]})
    assert windows.is_open(spec, at(SHANGHAI, 2026, 12, 31, 19, 59, 59))
    assert windows.state(spec, at(SHANGHAI, 2026, 12, 31, 12, 0)).until == at(SHANGHAI, 2026, 12, 31, 20, 0)
    assert not windows.is_open(spec, at(SHANGHAI, 2026, 12, 31, 20, 0))
    st = windows.state(spec, at(SHANGHAI, 2027, 1, 1, 1, 59, 59))
    assert not st.open and st.reason == "freeze launch-night" and st.next_open == at(SHANGHAI, 2027, 1, 1, 2, 0)
    assert windows.is_open(spec, at(SHANGHAI, 2027, 1, 1, 2, 0))
    # Open on every day with no freeze ahead: no closing within the lookahead.
    assert windows.state(spec, at(SHANGHAI, 2027, 1, 2, 0, 0)).until is None


def test_dst_gap_a_skipped_time_is_the_moment_the_clocks_jump() -> None:
    # Europe/Berlin, 2026-03-29: 02:00 CET becomes 03:00 CEST (01:00 UTC); 02:00-03:00 does not exist.
    jump = utc(2026, 3, 29, 1, 0)
    assert windows.instants(BERLIN, datetime(2026, 3, 29, 2, 30)) == (jump, jump)
    spec = spec_of({"timezone": "Europe/Berlin", "allow": [{"from": "02:30", "to": "04:00"}]})
    assert not windows.is_open(spec, jump - 1)
    assert windows.state(spec, utc(2026, 3, 29, 0, 0)).next_open == jump
    assert windows.state(spec, jump).until == utc(2026, 3, 29, 2, 0)  # 04:00 CEST
    # A window wholly inside the gap never opens that day; the next opening is the next day's.
    inside = spec_of({"timezone": "Europe/Berlin", "allow": [{"from": "02:00", "to": "02:30"}]})
    assert windows.state(inside, utc(2026, 3, 29, 0, 0)).next_open == at(BERLIN, 2026, 3, 30, 2, 0)
    # A window that ends inside the gap closes when the clocks jump.
    ending = spec_of({"timezone": "Europe/Berlin", "allow": [{"from": "01:30", "to": "02:30"}]})
    assert windows.state(ending, utc(2026, 3, 29, 0, 30)).until == jump


def test_dst_fold_resolves_towards_not_advancing() -> None:
    # Europe/Berlin, 2026-10-25: 03:00 CEST becomes 02:00 CET (01:00 UTC); 02:00-03:00 happens twice.
    first, second = utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1, 30)   # the two 02:30s
    assert windows.instants(BERLIN, datetime(2026, 10, 25, 2, 30)) == (first, second)
    opens = spec_of({"timezone": "Europe/Berlin", "allow": [{"from": "02:30", "to": "04:00"}]})
    assert not windows.is_open(opens, first) and windows.is_open(opens, second)   # opens at the later one
    closes = spec_of({"timezone": "Europe/Berlin", "allow": [{"from": "01:00", "to": "02:30"}]})
    assert windows.is_open(closes, first - 1) and not windows.is_open(closes, first)  # closes at the earlier one
    assert not windows.is_open(closes, second - 60)  # the second pass through 02:29 stays closed
    freeze = spec_of({"timezone": "Europe/Berlin", "allow": [{"from": "00:00", "to": "24:00"}],
                      "freeze": [{"name": "f", "from": "2026-10-25T02:30", "to": "2026-10-25T02:45"}]})
    assert not windows.is_open(freeze, first) and not windows.is_open(freeze, second + 14 * 60)  # both passes
    assert windows.state(freeze, first).next_open == utc(2026, 10, 25, 1, 45)  # after the later 02:45


def test_held_notes_the_hold_once_and_clears_it_when_open() -> None:
    spec = spec_of(OFFICE)
    rec = RolloutRecord(service="product", steps=["weight 10%", "weight 100%"])
    night = at(SHANGHAI, 2026, 12, 2, 22, 0)
    assert windows.held(rec, spec, night) and windows.held(rec, spec, night + 60)
    notes = [e["message"] for e in rec.events]
    assert notes == ["rollout product: step 1/2 held by window until 2026-12-03 10:00+08:00 Asia/Shanghai "
                     "(2026-12-03 02:00 UTC) (outside the allow windows)"]
    assert rec.to_json()["held"] == notes[0] and RolloutRecord.from_json(rec.to_json()).held == notes[0]
    rec.step = 1
    assert windows.held(rec, spec, night + 120) and len(rec.events) == 2  # a new step is a new hold
    assert not windows.held(rec, spec, at(SHANGHAI, 2026, 12, 3, 10, 0)) and rec.held is None
    assert not windows.held(rec, None, night)


# ---------------------------------------------------------------------------------------------- the document


def test_window_problems_name_the_field() -> None:
    def bad(raw: dict[str, Any]) -> list[str]:
        return problems(doc({"canary": "canary", "steps": [{"weight": 10}], "windows": raw}))

    where = "d: spec.services[0].rollout.windows"
    assert bad({**OFFICE, "timezone": "Mars/Olympus_Mons"}) == [
        f"{where}.timezone: 'Mars/Olympus_Mons' is not an IANA time zone (e.g. Asia/Shanghai, Europe/Berlin, UTC)"]
    assert bad({**OFFICE, "timezone": "localtime"})[0].startswith(f"{where}.timezone: 'localtime' is not an IANA")
    assert bad({"timezone": "UTC", "allow": [{"from": "10:00", "to": "10:00"}]}) == [
        f"{where}.allow[0].to: equals from: an empty window; for a whole day write from: \"00:00\", to: \"24:00\""]
    assert bad({**OFFICE, "freeze": [{"name": "x", "from": "2026-02-30", "to": "2026-03-01"}]}) == [
        f"{where}.freeze[0].from: '2026-02-30' is not a date that exists"]
    assert bad({**OFFICE, "freeze": [{"name": "x", "from": "2026-03-02T10:00", "to": "2026-03-02T09:00"}]}) == [
        f"{where}.freeze[0].to: '2026-03-02T09:00' is not after from '2026-03-02T10:00'"]
    assert any("timezone" in p for p in bad({"allow": OFFICE["allow"]}))  # the zone is required
    assert any("allow" in p for p in bad({"timezone": "UTC", "allow": []}))
    assert any("allow[0].from" in p for p in bad({"timezone": "UTC", "allow": [{"from": "25:00", "to": "26:00"}]}))
    assert any("days[0]" in p for p in bad({"timezone": "UTC", "allow": [{"days": ["monday"], "from": "10:00",
                                                                              "to": "11:00"}]}))


def test_an_unquoted_yaml_time_is_refused_with_a_hint() -> None:
    data = json.loads(doc({"canary": "canary", "steps": [{"weight": 10}], "windows": OFFICE}))
    text = yaml.safe_dump(data)
    assert "from: '10:00'" in text
    found = problems(text.replace("from: '10:00'", "from: 10:00").encode())  # YAML 1.1 reads 10:00 as 600
    assert len(found) == 1 and "windows.allow[0].from" in found[0] and "quote" in found[0]


# ---------------------------------------------------------------------------------------------- the controller

RAMP = {"canary": "canary", "steps": [{"weight": 10}, {"pause": "1h"}, {"weight": 50}, {"pause": "manual"},
                                      {"weight": 100}],
        "maxDuration": "100h", "windows": OFFICE}


def setup(tmp_path: Any, when: float, spec: dict[str, Any] = RAMP) -> tuple[FileStore, Clock, Controller]:
    store = FileStore(str(tmp_path / "store"))
    store.publish(doc(spec), 0, "test", "")
    clock = Clock()
    clock.now = when
    ctl = Controller(store, interval=1, clock=clock, sources=lambda _: Scripted())
    rollout.start(store, "product", clock)
    return store, clock, ctl


def record(store: FileStore) -> dict[str, Any]:
    data = store.read_record("product")[0]
    assert data is not None
    return data


def test_steps_wait_for_the_window_and_the_hold_is_noted_once(tmp_path: Any) -> None:
    store, clock, ctl = setup(tmp_path, at(SHANGHAI, 2026, 12, 2, 22, 0))  # Wednesday night
    for _ in range(5):
        ctl.tick()
        clock.now += 600
    assert store.current_number() == 1 and record(store)["step"] == 0
    held = [e["message"] for e in record(store)["events"] if "held by window" in e["message"]]
    assert held == ["rollout product: step 1/5 held by window until 2026-12-03 10:00+08:00 Asia/Shanghai "
                    "(2026-12-03 02:00 UTC) (outside the allow windows)"]
    clock.now = at(SHANGHAI, 2026, 12, 3, 10, 0)
    ctl.tick()
    assert store.current_number() == 2 and record(store)["weight"] == 1000 and "held" not in record(store)
    # The 1 h pause runs out at 11:00 inside the window; at 15:30 step 3 publishes; the manual gate follows.
    clock.now = at(SHANGHAI, 2026, 12, 3, 11, 0)
    ctl.tick()
    ctl.tick()
    assert record(store)["weight"] == 5000 and record(store)["step"] == 3


def test_a_pause_that_runs_out_after_hours_waits_and_a_promote_outside_waits_too(tmp_path: Any) -> None:
    store, clock, ctl = setup(tmp_path, at(SHANGHAI, 2026, 12, 4, 15, 30))  # Friday 15:30
    ctl.tick()                                   # 10 %
    clock.now = at(SHANGHAI, 2026, 12, 4, 16, 45)  # the pause ran out after 16:00
    ctl.tick()
    assert record(store)["step"] == 1 and store.current_number() == 2
    rollout.request(store, "product", "promote", clock)
    ctl.tick()
    assert record(store)["step"] == 1 and record(store)["requests"]["promote"] is True  # still pending
    monday = at(SHANGHAI, 2026, 12, 7, 10, 0)
    clock.now = monday
    ctl.tick()   # the waiting promote passes the pause
    assert record(store)["step"] == 2 and not record(store)["requests"].get("promote")
    ctl.tick()   # 50 %, then the manual gate
    rollout.request(store, "product", "promote", clock)
    ctl.tick()
    ctl.tick()   # 100 %
    assert record(store)["phase"] == "succeeded" and record(store)["weight"] == 10000


def test_abort_and_max_duration_are_never_held(tmp_path: Any) -> None:
    store, clock, ctl = setup(tmp_path, at(SHANGHAI, 2026, 12, 4, 15, 30))
    ctl.tick()
    clock.now = at(SHANGHAI, 2026, 12, 5, 3, 0)  # Saturday night, closed
    rollout.request(store, "product", "abort", clock)
    ctl.tick()
    assert record(store)["phase"] == "aborted" and store.current().content == store.get(1).content

    other = tmp_path / "other"
    other.mkdir()
    store, clock, ctl = setup(other, at(SHANGHAI, 2026, 12, 4, 15, 30), {**RAMP, "maxDuration": "48h"})
    ctl.tick()
    clock.now = at(SHANGHAI, 2026, 12, 6, 16, 0)  # Sunday: 48h passed, window closed
    ctl.tick()
    assert record(store)["phase"] == "rolled-back" and record(store)["reason"] == "maxDuration 172800s exceeded"


def test_status_shows_the_window(tmp_path: Any) -> None:
    store, _, _ = setup(tmp_path, at(SHANGHAI, 2026, 12, 2, 22, 0))
    done = grayagent("rollout", "status", "product", "--store", store.url, "-o", "json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)[0]["release_window"]  # computed at the real time: open or closed
    assert shown["timezone"] == "Asia/Shanghai" and isinstance(shown["open"], bool) and shown["text"]
    assert (shown["next_open"] is None) == shown["open"]
    text = grayagent("rollout", "status", "product", "--store", store.url).stdout
    assert "\n  window: " in text and "Asia/Shanghai" in text and "UTC)" in text


@pytest.mark.parametrize("zone", ["Asia/Shanghai", "Europe/Berlin", "America/New_York", "UTC"])
def test_the_next_opening_is_always_open_and_nothing_before_it_is(zone: str) -> None:
    """Every minute from now to the reported opening is closed, and the opening itself is open."""
    spec = spec_of({"timezone": zone, "allow": [{"days": ["sat", "sun"], "from": "01:30", "to": "03:15"}],
                    "freeze": [{"name": "f", "from": "2026-03-28", "to": "2026-03-28"}]})
    now = utc(2026, 3, 26, 12, 0)
    st = windows.state(spec, now)
    assert not st.open and st.next_open is not None and windows.is_open(spec, st.next_open)
    minute = now
    while minute < st.next_open:
        assert not windows.is_open(spec, minute), datetime.fromtimestamp(minute, ZoneInfo(zone))
        minute += 60


def test_far_and_endless_freezes_stay_cheap_and_say_no_opening_is_in_sight() -> None:
    far = spec_of({**OFFICE, "freeze": [{"name": "later", "from": "9999-12-01", "to": "9999-12-30"}]})
    assert windows.state(far, at(SHANGHAI, 2026, 12, 5, 12, 0)).next_open == at(SHANGHAI, 2026, 12, 7, 10, 0)
    endless = spec_of({**OFFICE, "freeze": [{"name": "forever", "from": "2026-01-01", "to": "9999-12-30"}]})
    st = windows.state(endless, at(SHANGHAI, 2026, 12, 5, 12, 0))
    assert not st.open and st.next_open is None and st.reason == "freeze forever"
    assert windows.describe(endless, at(SHANGHAI, 2026, 12, 5, 12, 0)) == "closed (freeze forever); no opening within 400 days"
    assert problems(doc({"canary": "canary", "steps": [{"weight": 10}], "windows": {
        **OFFICE, "freeze": [{"name": "x", "from": "2026-01-01", "to": "9999-12-31"}]}})) == [
        "d: spec.services[0].rollout.windows.freeze[0].to: '9999-12-31' is not a date that exists"]
