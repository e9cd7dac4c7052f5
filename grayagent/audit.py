"""The tamper-evident audit log: append-only JSON lines, each carrying the hash of the one before.

    {"seq": 7, "time": "...", "event": "apply", ..., "prev": "<hash of entry 6>", "hash": "<sha256 of this entry>"}

The hash covers the entry's canonical JSON without its "hash" field. `verify` detects an edited, removed,
inserted or reordered entry. `audit.head` (rewritten atomically after each append) records the last seq and
hash, so cutting entries off the end is detected too. Someone who can rewrite both files can forge a
consistent log; anchor the head elsewhere (the fleet status carries it) when that matters.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from grayagent.fsutil import RENDERED_MODE, atomic_write
from grayagent.stores.base import utc_now

GENESIS = "0" * 64


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


class AuditLog:
    """Appends are serialised across processes with flock(), and each one re-reads the chain's tail under
    the lock: the agent and a break-glass `grayagent local-revert` may write to the same log."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "audit.jsonl"
        self.head_path = state_dir / "audit.head"
        self._lock = threading.Lock()

    @staticmethod
    def _tail(fd: int) -> tuple[int, str]:
        """seq and hash of the last complete line (a torn line from a crash is skipped)."""
        size = os.fstat(fd).st_size
        chunk = min(size, 1 << 20)
        data = os.pread(fd, chunk, size - chunk) if chunk else b""
        for raw in reversed(data.split(b"\n")):
            if not raw.strip():
                continue
            try:
                last = json.loads(raw)
            except ValueError:
                continue
            return int(last.get("seq", 0)), str(last.get("hash", GENESIS))
        return 0, GENESIS

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, RENDERED_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                seq, prev = self._tail(fd)
                entry: dict[str, Any] = {"seq": seq + 1, "time": utc_now(), "event": event, **fields, "prev": prev}
                entry["hash"] = entry_hash(entry)
                os.write(fd, _canonical(entry) + b"\n")
                os.fsync(fd)
                atomic_write(self.head_path, _canonical({"seq": entry["seq"], "hash": entry["hash"]}) + b"\n")
            finally:
                os.close(fd)  # releases the flock
            return entry


def read_entries(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / "audit.jsonl"
    out = []
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                out.append(json.loads(raw))
    return out


def verify(state_dir: Path) -> list[str]:
    """Problems found in the chain, one line each; empty when the log is intact."""
    path = state_dir / "audit.jsonl"
    problems: list[str] = []
    prev, seq = GENESIS, 0
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return [f"{path}: no audit log"]
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
        except ValueError:
            problems.append(f"{path}:{lineno}: not valid JSON")
            continue
        if entry.get("hash") != entry_hash(entry):
            problems.append(f"{path}:{lineno}: entry seq {entry.get('seq')} was modified (hash mismatch)")
        if entry.get("prev") != prev:
            problems.append(f"{path}:{lineno}: entry seq {entry.get('seq')} does not follow the entry before it "
                            "(an entry was removed, inserted or reordered)")
        if entry.get("seq") != seq + 1:
            problems.append(f"{path}:{lineno}: sequence jumps from {seq} to {entry.get('seq')}")
        prev, seq = str(entry.get("hash")), int(entry.get("seq", seq + 1))
    try:
        head = json.loads((state_dir / "audit.head").read_bytes())
        if head.get("seq") != seq or head.get("hash") != prev:
            problems.append(f"{path}: the log ends at seq {seq} but audit.head records seq {head.get('seq')} "
                            "(entries were cut off the end)")
    except FileNotFoundError:
        if seq:
            problems.append(f"{state_dir / 'audit.head'}: missing")
    except ValueError:
        problems.append(f"{state_dir / 'audit.head'}: not valid JSON")
    return problems
