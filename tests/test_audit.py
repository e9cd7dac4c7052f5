"""The audit log's gaps: a cut tail is recorded by the next append and keeps `verify` failing until an
operator acknowledges it with an audited `grayagent audit ack`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grayagent.runtime.audit import AuditLog, entry_hash, read_entries, verify
from tests.agenthelp import grayagent
from tests.test_agent_cli import fill, small_tmpfs


def _cut(state: Path, entries: int) -> None:
    log = state / "audit.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:-entries]))


def _verify(state: Path) -> tuple[int, str]:
    done = grayagent("audit", "verify", "--state-dir", str(state))
    return done.returncode, done.stdout + done.stderr


def test_a_cut_tail_stays_detected_after_the_next_append_until_acknowledged(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path)
    for n in range(1, 6):
        audit.append("apply", version=n, result="ok")
    assert verify(tmp_path) == []
    _cut(tmp_path, 2)  # entries 4 and 5 removed
    audit.append("start", target="nginx")  # the agent's next append

    gap = read_entries(tmp_path)[3]
    assert gap["event"] == "gap" and gap["reason"] == "truncated"
    assert gap["expected"]["seq"] == 5 and gap["found"]["seq"] == 3
    code, out = _verify(tmp_path)
    assert code == 1 and "gap at seq 4 (truncated)" in out and "expected seq 5" in out and "ended at seq 3" in out

    done = grayagent("audit", "ack", "--state-dir", str(tmp_path), "--reason", "disk restored from backup",
                     "--operator", "alice@ops")
    assert done.returncode == 0, done.stderr
    ack = read_entries(tmp_path)[-1]
    assert ack["event"] == "ack" and ack["gaps"] == [4] and ack["operator"] == "alice@ops"
    assert ack["reason"] == "disk restored from backup"
    assert _verify(tmp_path)[0] == 0

    audit.append("apply", version=6, result="ok")
    _cut(tmp_path, 1)  # a second cut, after the ack
    audit.append("apply", version=7, result="ok")
    code, out = _verify(tmp_path)
    assert code == 1 and "gap at seq 7 (truncated)" in out and "gap at seq 4" not in out


def test_ack_without_a_gap_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path)
    audit.append("start")
    before = (tmp_path / "audit.jsonl").read_bytes()
    done = grayagent("audit", "ack", "--state-dir", str(tmp_path), "--reason", "x")
    assert done.returncode == 1 and "no unacknowledged gap" in done.stderr
    assert (tmp_path / "audit.jsonl").read_bytes() == before


def test_a_lost_head_and_a_recorded_write_failure_are_gaps(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path)
    audit.append("start")
    (tmp_path / "audit.head").unlink()
    audit.append("apply", version=1)
    audit.record_gap("write_failed", lost_since="2026-01-01T00:00:00Z")
    problems = verify(tmp_path)
    assert len(problems) == 2
    assert "gap at seq 2 (head_missing)" in problems[0] and "gap at seq 4 (write_failed)" in problems[1]
    assert "lost_since=2026-01-01T00:00:00Z" in problems[1]
    entry = audit.acknowledge("known outage", "bob")
    assert entry["gaps"] == [2, 4] and verify(tmp_path) == []


def test_a_head_left_behind_is_a_crash_not_a_gap(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path)
    audit.append("start")
    head = (tmp_path / "audit.head").read_bytes()
    audit.append("apply", version=1)
    audit.append("apply", version=2)
    (tmp_path / "audit.head").write_bytes(head)  # the head writes failed (a crash, a full disk); the log's did not
    assert verify(tmp_path) == []
    audit.append("apply", version=3)
    assert [e["event"] for e in read_entries(tmp_path)] == ["start", "apply", "apply", "apply"]
    assert verify(tmp_path) == []


def test_a_replaced_tail_is_a_gap_too(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path)
    for n in range(3):
        audit.append("apply", version=n)
    _cut(tmp_path, 1)
    forged: dict[str, object] = {"seq": 3, "time": "t", "event": "apply", "version": 99,
                                 "prev": read_entries(tmp_path)[-1]["hash"]}
    forged["hash"] = entry_hash(forged)  # a forged last entry, chained correctly; the head names the real one
    with open(tmp_path / "audit.jsonl", "a") as f:
        f.write(json.dumps(forged) + "\n")
    assert "its last entries were replaced" in verify(tmp_path)[0]
    audit.append("start")
    gap = read_entries(tmp_path)[3]
    assert gap["event"] == "gap" and gap["reason"] == "diverged"


def test_a_cut_found_by_the_ack_itself_stays_open(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path)
    for n in range(4):
        audit.append("apply", version=n)
    _cut(tmp_path, 1)
    audit.append("start")           # gap at seq 4
    audit.append("apply", version=5)
    _cut(tmp_path, 1)               # cut again before the operator acknowledges
    entry = audit.acknowledge("seen gap 4", "ops")
    assert entry["gaps"] == [4]
    problems = verify(tmp_path)
    assert len(problems) == 1 and "gap at seq 6 (truncated)" in problems[0]


def test_a_torn_last_line_does_not_swallow_the_next_entry(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path)
    audit.append("start")
    with open(tmp_path / "audit.jsonl", "a") as f:
        f.write('{"seq": 2, "tim')  # a crash mid-write
    entry = audit.append("apply", version=1)
    last = (tmp_path / "audit.jsonl").read_text().splitlines()[-1]
    assert json.loads(last) == entry


def test_a_full_disk_leaves_no_torn_line_only_the_recorded_gap(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "state", "64k") as state:
        audit = AuditLog(state)
        audit.append("start", target="nginx")
        before = (state / "audit.jsonl").read_bytes()
        assert len(before) % 4096, "the log's last page has room left: the big entry's write will be short"
        filler = fill(state)
        with pytest.raises(OSError):  # fills the last page, then the disk: a short write
            audit.append("apply", version=1, error="x" * 6000)
        assert (state / "audit.jsonl").read_bytes() == before
        with pytest.raises(OSError):  # fits in the last page, but the head needs a fresh block
            audit.append("apply", version=2)
        assert (state / "audit.jsonl").read_bytes() == before

        filler.unlink()  # space returns
        audit.record_gap("write_failed", lost=2)
        audit.append("apply", version=3)
        assert [e["event"] for e in read_entries(state)] == ["start", "gap", "apply"]
        problems = verify(state)
        assert len(problems) == 1 and "gap at seq 2 (write_failed): lost=2" in problems[0], problems


HOSTILE_LINES = {
    "nested 100k deep": "[" * 100_000,
    "seq is text": '{"seq": "x", "hash": "y"}',
    "seq is a list": '{"seq": [1], "hash": "y"}',
    "seq is infinite": '{"seq": 1e400, "hash": "y"}',
    "ack with unhashable gaps": '{"seq": 3, "event": "ack", "gaps": [[1]]}',
    "ack with gaps not a list": '{"seq": 3, "event": "ack", "gaps": 5}',
    "steps and event of odd types": '{"seq": 3, "steps_ms": {"a": "b"}, "event": ["x"]}',
}


@pytest.mark.parametrize("line", HOSTILE_LINES.values(), ids=HOSTILE_LINES.keys())
def test_a_hostile_line_is_reported_never_a_crash(tmp_path: Path, line: str) -> None:
    """Anyone who can write the state dir can append anything: the agent's next append, verify and show
    must report it in one line each, never die with a traceback (RecursionError, ValueError, TypeError)."""
    audit = AuditLog(tmp_path)
    audit.append("start")
    audit.append("apply", version=1, result="ok")
    with open(tmp_path / "audit.jsonl", "a") as f:
        f.write(line + "\n")
    audit.append("start")  # the agent's next start
    code, out = _verify(tmp_path)
    assert code == 1 and "Traceback" not in out and f"{tmp_path / 'audit.jsonl'}:3:" in out
    shown = grayagent("audit", "show", "--state-dir", str(tmp_path))
    assert "Traceback" not in shown.stderr and len(shown.stderr.strip().splitlines()) <= 1


def test_a_hostile_head_is_a_gap_never_a_crash(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path)
    audit.append("start")
    (tmp_path / "audit.head").write_text("[" * 100_000)
    code, out = _verify(tmp_path)
    assert code == 1 and "audit.head: not valid JSON" in out
    audit.append("start")
    assert read_entries(tmp_path)[1]["reason"] == "head_missing"
