"""The embedded default store: a local directory.

Layout (stable; other tools may read it):
    <dir>/versions/<N>.json   immutable; the version envelope (stores/envelope.py), chained to its parent
    <dir>/current             the current version number and a newline
    <dir>/.lock               flock()ed by publishers, so compare-and-set holds across processes
    <dir>/agents/<host>.json  each agent's status, with an expiry time (a directory has no leases)
    <dir>/rollouts/<name>.json  rollout records, compare-and-set on a revision under .lock
    <dir>/rollouts/.leader    flock()ed by the leading rollout controller
A directory that does not exist is not a store (stores.open_store): only publish creates one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from grayagent.errors import Conflict, StoreError, UsageError, VersionNotFound
from grayagent.fsutil import atomic_write, create_exclusive
from grayagent.rules.docload import loads_json
from grayagent.stores import envelope
from grayagent.stores.base import (
    Leadership,
    RecordConflict,
    VersionMeta,
    VersionRecord,
    WatchHandler,
    digest_of,
    utc_now,
)
from grayagent.text import is_decimal

SAFETY_POLL_SECONDS = 2.0  # inotify can miss events (NFS, overlay mounts); a cheap re-check covers it
# watchdog event types that can mean `current` changed (atomic_write renames a temporary file over it).
CHANGING_EVENTS = frozenset({"created", "modified", "moved", "deleted", "closed"})
AGENT_ENTRY_TTL = 90.0  # agents re-report at least every 30 s (the resync interval)


def path_from_url(url: str) -> Path:
    if url.startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"--store: {url}: file URLs name a local path (file:///abs/dir)")
        if not parts.path:
            raise UsageError(f"--store: {url}: the file URL has no path")
        return Path(unquote(parts.path))
    return Path(url).expanduser().resolve()


class FileStore:
    def __init__(self, url: str) -> None:
        self.root = path_from_url(url)
        self.url = f"file://{self.root}"
        self.versions_dir = self.root / "versions"
        self.current_path = self.root / "current"

    def require_present(self, *, publishing: bool, create: bool, vanished_ok: bool) -> None:
        """Refuse a store directory that does not exist (see stores.open_store for the exceptions)."""
        if self.root.is_dir():
            return
        if self.root.exists():
            raise UsageError(f"--store: {self.root}: not a directory")
        if publishing:
            if create or self.root.parent.is_dir():
                return
            raise UsageError(f"--store: {self.root}: no such directory, nor its parent {self.root.parent}; "
                             "check the path, or give publish --create to make both")
        if vanished_ok:
            return
        raise UsageError(f"--store: {self.root}: no such store directory (check the path; "
                         "`grayagent publish` creates a store)")

    # ------------------------------------------------------------------ reading

    def _read_current_number(self) -> int:
        try:
            text = self.current_path.read_bytes().decode("ascii", "replace").strip()
        except FileNotFoundError:
            return 0  # a store directory that does not exist yet is empty; the first publish creates it
        except OSError as exc:
            raise StoreError(f"{self.url}: {exc.strerror}") from None
        if not is_decimal(text) or int(text) > envelope.MAX_VERSION:
            raise StoreError(f"{self.current_path}: not a version number")
        return int(text)

    def _version_path(self, version: int) -> Path:
        return self.versions_dir / f"{version:010d}.json"

    def _load(self, path: Path) -> dict[str, Any]:
        try:
            data = loads_json(path.read_bytes())
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StoreError(f"{path}: unreadable version entry: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise envelope.DamagedVersion(f"{path}: unreadable version entry: {exc}") from None
        if not envelope.is_envelope(data):
            raise envelope.DamagedVersion(f"{path}: not a version envelope")
        assert isinstance(data, dict)
        return data

    def current_number(self) -> int:
        return self._read_current_number()

    def current(self) -> VersionRecord | None:
        number = self._read_current_number()
        return self.get(number) if number else None

    def get(self, version: int) -> VersionRecord:
        path = self._version_path(version)
        try:
            data = self._load(path)
        except FileNotFoundError:
            raise VersionNotFound(f"version {version} does not exist in {self.url}") from None
        # The file's own number must be the one asked for: a renamed or swapped file is refused.
        return envelope.decode(data, str(path), version)

    def _version_files(self) -> Iterator[Path]:
        if not self.versions_dir.is_dir():
            return iter(())
        return (p for p in self.versions_dir.glob("*.json") if is_decimal(p.stem))

    def history(self) -> list[VersionMeta]:
        metas = [envelope.meta_of(self._load(p), str(p)) for p in self._version_files()]
        return sorted(metas, key=lambda m: m.version)

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def publish(self, content: bytes, expected: int, author: str, message: str) -> VersionMeta:
        envelope.require_utf8(content)
        with self._locked():
            current = self._read_current_number()
            if current != expected:
                raise Conflict(expected, current)
            # A crash between writing a version and moving the pointer leaves an orphan; never reuse its number.
            highest = max((int(p.stem) for p in self._version_files()), default=0)
            meta = VersionMeta(max(highest, current) + 1, current, utc_now(), author, message, digest_of(content),
                               envelope.parent_link(self.get, current))
            entry = envelope.encode(meta, content, indent=1)
            if not create_exclusive(self._version_path(meta.version), entry):
                raise StoreError(f"version {meta.version} appeared during publish")
            atomic_write(self.current_path, f"{meta.version}\n".encode())
        return meta

    # ------------------------------------------------------------------ watching

    def _current_signature(self) -> tuple[int, int, int] | None:
        """(inode, mtime_ns, size) of `current`: what changes when a publish replaces it; None when absent."""
        try:
            st = self.current_path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def watch(self, handler: WatchHandler, stop: threading.Event) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        current_name = self.current_path.name
        signature_lock = threading.Lock()
        last_signature: list[tuple[int, int, int] | None] = [self._current_signature()]

        def wake_if_changed() -> None:
            # Readers (this agent's own sync included) open and close `current` too: only a new signature
            # is a change, or every read would trigger the next one (issue 12: a core spun by an idle agent).
            signature = self._current_signature()
            with signature_lock:
                if signature == last_signature[0]:
                    return
                last_signature[0] = signature
            handler.changed()

        class _OnCurrent(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type not in CHANGING_EVENTS:
                    return  # opened, closed-without-write, attrib: a read, not a change
                paths = (event.src_path, getattr(event, "dest_path", "") or "")
                if any(os.path.basename(str(p)) == current_name for p in paths):
                    wake_if_changed()

        observer = None
        reachable: bool | None = None
        try:
            while not stop.is_set():
                ok = self.root.is_dir()
                if ok != reachable:
                    reachable = ok
                    handler.store_state(ok, "" if ok else f"{self.root} is missing")
                    if ok and observer is None:
                        observer = Observer()
                        observer.schedule(_OnCurrent(), str(self.root), recursive=False)
                        observer.start()
                    handler.changed()
                if ok:
                    wake_if_changed()  # the safety poll, for events inotify missed
                stop.wait(SAFETY_POLL_SECONDS)
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)

    # ------------------------------------------------------------------ fleet status

    def report(self, host: str, status: dict[str, object]) -> None:
        """agents/<host>.json with an expiry, since a directory has no leases."""
        if not self.root.is_dir():  # never recreate a vanished store just to report into it
            raise StoreError(f"{self.url}: no such directory")
        entry = {**status, "host": host, "expires_unix": time.time() + AGENT_ENTRY_TTL}
        atomic_write(self.root / "agents" / f"{_safe_host(host)}.json", json.dumps(entry, sort_keys=True).encode())

    def fleet(self) -> list[dict[str, object]]:
        now = time.time()
        out = []
        for path in sorted((self.root / "agents").glob("*.json")):
            with contextlib.suppress(OSError, ValueError, TypeError):  # TypeError: expires_unix edited to a list
                entry = loads_json(path.read_bytes())
                if isinstance(entry, dict) and float(entry.get("expires_unix", 0)) > now:
                    out.append(entry)
        return out

    # ------------------------------------------------------------------ rollout state

    def _record_path(self, name: str) -> Path:
        return self.root / "rollouts" / f"{_safe_host(name)}.json"

    def read_record(self, name: str) -> tuple[dict[str, Any] | None, int]:
        try:
            entry = loads_json(self._record_path(name).read_bytes())
        except FileNotFoundError:
            return None, 0
        except (OSError, ValueError) as exc:
            raise StoreError(f"{self._record_path(name)}: unreadable: {exc}") from None
        return entry["record"], int(entry["revision"])

    def write_record(self, name: str, record: dict[str, Any], expected: int) -> int:
        with self._locked():  # the publishers' lock: short, and it makes the compare-and-set hold across processes
            _, revision = self.read_record(name)
            if revision != expected:
                raise RecordConflict(f"rollout record {name!r} changed (revision {revision}, expected {expected})")
            entry = {"revision": revision + 1, "record": record}
            atomic_write(self._record_path(name), json.dumps(entry, sort_keys=True).encode())
        return revision + 1

    def record_names(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "rollouts").glob("*.json"))

    def acquire_leadership(self, holder: str) -> Leadership | None:
        """flock on rollouts/.leader, held for as long as the returned object lives (and the process does)."""
        (self.root / "rollouts").mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "rollouts" / ".leader", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder}\n".encode(), 0)  # who leads, for people; the lock is what counts
        return _FlockLeadership(fd)

    def close(self) -> None:
        pass


class _FlockLeadership:
    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def held(self) -> bool:
        return self._fd is not None  # a flock lasts until its file is closed

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _safe_host(host: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in host)[:200] or "_"
