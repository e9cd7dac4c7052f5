"""Crash-safe file writes: temp file in the same directory, fsync, rename, fsync the directory."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

RENDERED_MODE = 0o640


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: Path, data: bytes, mode: int) -> str:
    """A fully written, fsynced temp file beside `path` (same filesystem, so rename/link are atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:  # a full disk: say which file could not be written
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    return tmp


def atomic_write(path: Path, data: bytes, mode: int = RENDERED_MODE) -> None:
    """Replace `path` with `data` so that a crash leaves either the old file or the new one, never a mix."""
    tmp = _write_temp(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def create_exclusive(path: Path, data: bytes, mode: int = RENDERED_MODE) -> bool:
    """Write `path` only if it does not exist yet, atomically. False if it already existed."""
    tmp = _write_temp(path, data, mode)
    try:
        os.link(tmp, path)  # link() fails if the name exists: immutability without a race
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)
    return True


def remove_stale_temps(path: Path) -> int:
    """Remove the temp files that `atomic_write(path)` leaves if the process dies between write and rename.

    `path` may end in a glob (`cache/*.json`). Call it only at start-up, when no writer of `path` runs.
    Returns how many were removed.
    """
    removed = 0
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
            removed += 1
    return removed
