"""The tamper-evident audit log: append-only JSON lines, each carrying the hash of the one before.

    {"seq": 7, "time": "...", "event": "apply", ..., "prev": "<hash of entry 6>", "hash": "<sha256 of this entry>"}

The hash covers the entry's canonical JSON without its "hash" field. `verify` detects an edited, removed,
inserted or reordered entry. `audit.head` (rewritten atomically after each append) records the last seq and
hash, so cutting entries off the end is detected too.

Every append first compares the log's tail with `audit.head`. A mismatch (entries cut off, or the head
lost) is never silently chained over: the append writes a `gap` entry first, saying what the head expected
and what the log held. Other writers record their own losses the same way (`record_gap`, e.g. reason
`write_failed` after a full disk). `verify` fails on every gap until an operator acknowledges it with
`grayagent audit ack --reason ...`, which is itself an audited `ack` entry listing the gaps it covers.

Someone who can rewrite both files can still forge a consistent log; copy the log or its head off the
host when that matters.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from grayagent.errors import GrayagentError
from grayagent.fsutil import RENDERED_MODE, atomic_write
from grayagent.rules.docload import loads_json
from grayagent.runtime.state import StateDir
from grayagent.stores.base import utc_now

log = structlog.get_logger("grayagent.runtime.audit")

GENESIS = "0" * 64
GAP_EVENT = "gap"
ACK_EVENT = "ack"
# Reasons a gap entry gives. truncated: the log ends before the head; diverged: the log's tail is not the
# entry the head names; head_missing: audit.head is gone or unreadable while the log has entries;
# write_failed: entries could not be written (a full disk), recorded once writing works again.
GAP_REASONS = ("truncated", "diverged", "head_missing", "write_failed")


class NothingToAcknowledge(GrayagentError):
    """`audit ack` found no unacknowledged gap."""


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def _is_entry(value: Any) -> bool:
    """A dict whose seq is a whole number: what the chain arithmetic (seq + 1) can work with."""
    seq = value.get("seq") if isinstance(value, dict) else None
    return isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0


def _read_head(path: Path) -> dict[str, Any] | None:
    """The head's {"seq", "hash"}; None when missing or unreadable."""
    try:
        head = loads_json(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    return head if isinstance(head, dict) else None


def _head_mismatch(head: dict[str, Any] | None, tail: dict[str, Any] | None,
                   entry_at: Callable[[int], dict[str, Any] | None]) -> str | None:
    """The gap reason when the log does not end where audit.head says, else None.

    A head behind the tail whose entry is still in the log (`entry_at(seq)`) lost nothing: a crash (or a
    full disk) came between a log write and its head write.
    """
    tail_seq = int(tail.get("seq", 0)) if tail else 0
    tail_hash = str(tail.get("hash", GENESIS)) if tail else GENESIS
    if head is None:
        return "head_missing" if tail_seq else None
    head_seq = head.get("seq")
    if head_seq == tail_seq and head.get("hash") == tail_hash:
        return None
    if not isinstance(head_seq, int) or isinstance(head_seq, bool):
        return "diverged"
    if head_seq > tail_seq:
        return "truncated"
    named = entry_at(head_seq) if head_seq > 0 else {"hash": GENESIS}
    return None if head_seq < tail_seq and named is not None and named.get("hash") == head.get("hash") \
        else "diverged"


def _mark(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    return {"seq": entry.get("seq"), "hash": entry.get("hash")} if entry else None


def _open_gaps(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gap entries that no later ack lists."""
    acked: set[int] = set()
    for entry in entries:
        gaps = entry.get("gaps")
        if entry.get("event") == ACK_EVENT and isinstance(gaps, list):
            acked.update(g for g in gaps if isinstance(g, int))
    return [e for e in entries if e.get("event") == GAP_EVENT and e.get("seq") not in acked]


class AuditLog:
    """Appends are serialised across processes with flock(), and each one re-reads the chain's tail under
    the lock: the agent and a break-glass `grayagent local-revert` may write to the same log."""

    def __init__(self, state_dir: Path) -> None:
        state = StateDir(state_dir)
        self.path = state.audit
        self.head_path = state.audit_head
        self._lock = threading.Lock()

    @staticmethod
    def _tail(fd: int) -> dict[str, Any] | None:
        """The last complete entry (a torn line from a crash is skipped); None for an empty log."""
        size = os.fstat(fd).st_size
        chunk = min(size, 1 << 20)
        data = os.pread(fd, chunk, size - chunk) if chunk else b""
        for raw in reversed(data.split(b"\n")):
            if not raw.strip():
                continue
            try:
                last = loads_json(raw)
            except ValueError:
                continue
            if _is_entry(last):
                return dict(last)
        return None

    def _write(self, fd: int, tail: dict[str, Any] | None, event: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Append one entry and move the head to it, or leave both files as they were.

        On a full disk the log's write can be short (the entry fills the file's last page) or the head's
        can fail (it needs a fresh block): either way the log is cut back to where it was, so no torn line
        stays for the next entry to run into, and the caller learns the entry was not written."""
        seq = int(tail.get("seq", 0)) if tail else 0
        prev = str(tail.get("hash", GENESIS)) if tail else GENESIS
        entry: dict[str, Any] = {"seq": seq + 1, "time": utc_now(), "event": event, **fields, "prev": prev}
        entry["hash"] = entry_hash(entry)
        size = os.fstat(fd).st_size
        # A torn line from a crash (or a process killed mid-write) must not swallow this entry: start anew.
        data = (b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b"") + _canonical(entry) + b"\n"
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)", str(self.path))
            os.fsync(fd)
            atomic_write(self.head_path, _canonical({"seq": entry["seq"], "hash": entry["hash"]}) + b"\n")
        except BaseException:
            head = _read_head(self.head_path)
            if head is None or head.get("hash") != entry["hash"]:  # the head does not name it: take it back
                os.ftruncate(fd, size)
                os.fsync(fd)
            raise
        return entry

    def _append_locked(self, event: str, fields: dict[str, Any],
                       before_write: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
        with self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, RENDERED_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if before_write is not None:
                    fields = before_write(fields)
                tail = self._tail(fd)
                head = _read_head(self.head_path)

                def entry_at(seq: int) -> dict[str, Any] | None:  # only read when the head is behind
                    return next((e for e in _readable_entries(self.path) if e.get("seq") == seq), None)
                reason = _head_mismatch(head, tail, entry_at)
                if reason is not None:  # never chain silently over a cut: say what was lost first
                    found = _mark(tail) or {"seq": 0, "hash": GENESIS}
                    log.error("audit log does not match its head; recording a gap", reason=reason,
                              expected=_mark(head), found=found, path=str(self.path))
                    tail = self._write(fd, tail, GAP_EVENT, {"reason": reason, "expected": _mark(head), "found": found})
                return self._write(fd, tail, event, fields)
            finally:
                os.close(fd)  # releases the flock

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        return self._append_locked(event, fields)

    def record_gap(self, reason: str, **details: Any) -> dict[str, Any]:
        """Mark entries that were lost (e.g. reason="write_failed"); `verify` fails until it is acknowledged."""
        return self._append_locked(GAP_EVENT, {"reason": reason, **details})

    def acknowledge(self, reason: str, operator: str) -> dict[str, Any]:
        """Append an `ack` entry covering every gap recorded so far; NothingToAcknowledge when there is none.

        The gaps are read before the append: a gap the ack's own append discovers stays open, because the
        operator has not seen it.
        """
        def covered(fields: dict[str, Any]) -> dict[str, Any]:
            gaps = _open_gaps(_readable_entries(self.path))
            if not gaps:
                raise NothingToAcknowledge(f"{self.path}: no unacknowledged gap")
            return {**fields, "gaps": [g.get("seq") for g in gaps]}
        return self._append_locked(ACK_EVENT, {"reason": reason, "operator": operator}, before_write=covered)


def _readable_entries(path: Path) -> list[dict[str, Any]]:
    """Every entry that parses (verify reports the others)."""
    out: list[dict[str, Any]] = []
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return out
    for raw in lines:
        try:
            entry = loads_json(raw)
        except ValueError:
            continue
        if _is_entry(entry):
            out.append(entry)
    return out


def read_entries(state_dir: Path) -> list[dict[str, Any]]:
    """Every entry; ValueError naming the line when one is not an entry (`audit verify` says more)."""
    path = StateDir(state_dir).audit
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                try:
                    entry = loads_json(raw)
                except ValueError as exc:
                    raise ValueError(f"line {lineno}: {exc}") from None
                if not _is_entry(entry):
                    raise ValueError(f"line {lineno} is not an audit entry")
                out.append(entry)
    return out


def _describe_gap(path: Path, lineno: int, gap: dict[str, Any]) -> str:
    def at(mark: Any) -> str:
        if not isinstance(mark, dict):
            return "nothing"
        return f"seq {mark.get('seq')} (hash {str(mark.get('hash'))[:12]})"
    reason = gap.get("reason", "unknown")
    detail = f"audit.head expected {at(gap.get('expected'))}, the log ended at {at(gap.get('found'))}" \
        if "found" in gap else ", ".join(f"{k}={v}" for k, v in gap.items()
                                         if k not in ("seq", "time", "event", "reason", "prev", "hash"))
    return (f"{path}:{lineno}: gap at seq {gap.get('seq')} ({reason}): {detail}; not acknowledged "
            f"(grayagent audit ack --state-dir {path.parent} --reason TEXT)")


def verify(state_dir: Path) -> list[str]:
    """Problems found in the chain, one line each; empty when the log is intact and every gap acknowledged."""
    state = StateDir(state_dir)
    path = state.audit
    problems: list[str] = []
    prev, seq = GENESIS, 0
    entries: list[tuple[int, dict[str, Any]]] = []
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return [f"{path}: no audit log"]
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            entry = loads_json(raw)
        except ValueError:
            problems.append(f"{path}:{lineno}: not valid JSON")
            continue
        if not _is_entry(entry):
            problems.append(f"{path}:{lineno}: not an entry (its seq is not a whole number)")
            continue
        entries.append((lineno, entry))
        if entry.get("hash") != entry_hash(entry):
            problems.append(f"{path}:{lineno}: entry seq {entry.get('seq')} was modified (hash mismatch)")
        if entry.get("prev") != prev:
            problems.append(f"{path}:{lineno}: entry seq {entry.get('seq')} does not follow the entry before it "
                            "(an entry was removed, inserted or reordered)")
        if entry.get("seq") != seq + 1:
            problems.append(f"{path}:{lineno}: sequence jumps from {seq} to {entry.get('seq')}")
        prev, seq = str(entry.get("hash")), entry["seq"]
    open_gaps = {id(g) for g in _open_gaps([e for _, e in entries])}
    problems += [_describe_gap(path, lineno, e) for lineno, e in entries if id(e) in open_gaps]
    head_path = state.audit_head
    head = _read_head(head_path)
    tail = entries[-1][1] if entries else None
    if head is None and head_path.exists():
        problems.append(f"{head_path}: not valid JSON")
    elif head is None:
        if seq:
            problems.append(f"{head_path}: missing")
    elif (reason := _head_mismatch(head, tail, lambda n: next((e for _, e in entries if e.get("seq") == n),
                                                               None))) is not None:
        why = "entries were cut off the end" if reason == "truncated" else "its last entries were replaced"
        problems.append(f"{path}: the log ends at seq {seq} but audit.head records seq {head.get('seq')} ({why})")
    return problems
