"""The agent's state dir: the one place that knows its layout and its permissions.

    <state>/              0750  the agent's user; the group may read (status, audit)
      pinned.json               break-glass pin (`grayagent local-revert`)
      status.json               the agent's last status (health included)
      cache/<store key>/        per store (runtime/cache.py): last-good.json, the version to start from
                                when the store is unreachable, and <N>.json, recent versions for a local revert
      audit.jsonl, audit.head   the hash-chained audit log
      tmp/                0700  scratch files and directories of every component; emptied at each start

Every other module asks a `StateDir` for paths instead of joining names itself. Scratch space lives here,
not in the system temp dir, so that a crash leaves nothing behind that the next start does not remove.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from grayagent.errors import UsageError
from grayagent.fsutil import remove_stale_temps

DIR_MODE = 0o750
TMP_MODE = 0o700

PIN_FILE = "pinned.json"
STATUS_FILE = "status.json"
CACHE_DIR = "cache"
AUDIT_FILE = "audit.jsonl"
AUDIT_HEAD_FILE = "audit.head"
TMP_DIR = "tmp"


class StateDir:
    """Paths inside one state dir. Building one touches nothing; `prepare()` creates and cleans it."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"StateDir({str(self.root)!r})"

    @property
    def pin(self) -> Path:
        return self.root / PIN_FILE

    @property
    def status(self) -> Path:
        return self.root / STATUS_FILE

    @property
    def cache_dir(self) -> Path:
        return self.root / CACHE_DIR

    @property
    def audit(self) -> Path:
        return self.root / AUDIT_FILE

    @property
    def audit_head(self) -> Path:
        return self.root / AUDIT_HEAD_FILE

    def tmp_dir(self) -> Path:
        """The scratch directory (0700), created on demand. Nothing in it survives the next `prepare()`."""
        path = self.root / TMP_DIR
        self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        path.mkdir(exist_ok=True, mode=TMP_MODE)
        return path

    @contextlib.contextmanager
    def temp_directory(self, prefix: str) -> Iterator[Path]:
        """A fresh directory under tmp/, removed when the block ends, however it ends."""
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp_dir()))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def existing(self) -> StateDir:
        """This state dir, which must exist: a command that reads an agent's state names a mistyped path."""
        if not self.root.is_dir():
            raise UsageError(f"--state-dir: {self.root}: no such directory (the agent's state dir)")
        return self

    def ensure(self) -> StateDir:
        """Create the dir if it is missing; touch nothing inside."""
        self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        return self

    def prepare(self) -> StateDir:
        """At a service's start, before anything (a target) takes scratch space: create the dir and remove what
        a crash left, tmp/'s contents and half-written atomic writes."""
        self.ensure().clean()
        return self

    def clean(self) -> int:
        """Remove leftovers of an earlier run (call only when no other process of this agent is running).
        Returns how many were removed."""
        removed = 0
        tmp = self.root / TMP_DIR
        if tmp.is_dir():
            for entry in tmp.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed += 1
        for path in (self.pin, self.status, self.audit_head):
            removed += remove_stale_temps(path)
        if self.cache_dir.is_dir():
            for store_cache in (d for d in self.cache_dir.iterdir() if d.is_dir()):
                removed += remove_stale_temps(store_cache / "*")
        return removed
