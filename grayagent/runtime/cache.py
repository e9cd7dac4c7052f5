"""The agent's version cache under its state dir, one directory per store (issue 13: never mix two stores).

    <state>/cache/<key>/store            the store's identity (stores/urls.store_identity), for people
    <state>/cache/<key>/last-good.json   the last version applied from that store: start-up without the store
    <state>/cache/<key>/<N>.json         the versions applied recently: what `local-revert` can restore

<key> is a hash of the store's identity, so a host moved to another store starts with an empty cache there
and never applies, lists or restores the other store's versions. Entries are version envelopes
(stores/envelope.py). Files of the unkeyed layout before this one (<state>/last-good.json,
<state>/cache/<N>.json) cannot be told apart by store and are ignored.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import structlog

from grayagent.errors import StoreError, UsageError
from grayagent.fsutil import RENDERED_MODE, atomic_write
from grayagent.runtime.state import StateDir
from grayagent.stores import envelope
from grayagent.stores.base import VersionRecord
from grayagent.stores.urls import store_identity
from grayagent.text import is_decimal

log = structlog.get_logger("grayagent.cache")

LAST_GOOD = "last-good.json"
IDENTITY_FILE = "store"
CACHE_KEEP = 20


def cache_dir(state_dir: Path, store_url: str) -> Path:
    identity = store_identity(store_url)
    return StateDir(state_dir).cache_dir / hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]


def save_cache(state_dir: Path, store_url: str, record: VersionRecord) -> None:
    """last-good.json for start-up without the store, and <N>.json for a break-glass local revert."""
    where = cache_dir(state_dir, store_url)
    entry = envelope.encode(record.meta, record.content)
    atomic_write(where / IDENTITY_FILE, (store_identity(store_url) + "\n").encode(), RENDERED_MODE)
    atomic_write(where / f"{record.version:010d}.json", entry, RENDERED_MODE)
    atomic_write(where / LAST_GOOD, entry, RENDERED_MODE)
    for old in sorted(p for p in where.glob("*.json") if is_decimal(p.stem))[:-CACHE_KEEP]:
        old.unlink(missing_ok=True)


def has_cache(state_dir: Path, store_url: str) -> bool:
    """This host applied versions of that store before: it existed, even if it is gone now."""
    return cache_dir(state_dir, store_url).is_dir()


def load_cache(state_dir: Path, store_url: str) -> VersionRecord | None:
    return read_record(cache_dir(state_dir, store_url) / LAST_GOOD)


def cached_stores(state_dir: Path) -> dict[str, Path]:
    """identity -> cache directory, for every store this host has cached versions of."""
    out = {}
    for identity_file in sorted(StateDir(state_dir).cache_dir.glob(f"*/{IDENTITY_FILE}")):
        try:
            out[identity_file.read_text("utf-8").strip()] = identity_file.parent
        except OSError:
            continue
    return out


def cached_versions(state_dir: Path, store_url: str | None) -> list[VersionRecord]:
    """The versions this host applied recently from the store, oldest first.

    Without a store URL (a break-glass run given only the state dir), the one store cached here; several
    are a usage error, since picking one could restore another store's version.
    """
    if store_url is not None:
        where = cache_dir(state_dir, store_url)
    else:
        stores = cached_stores(state_dir)
        if len(stores) > 1:
            raise UsageError(f"--store: {StateDir(state_dir).cache_dir} holds versions of {len(stores)} stores "
                             f"({', '.join(sorted(stores))}); name the store")
        if not stores:
            return []
        where = next(iter(stores.values()))
    out = []
    for path in sorted(p for p in where.glob("*.json") if is_decimal(p.stem)):
        record = read_record(path, int(path.stem))
        if record is not None:
            out.append(record)
    return out


def read_record(path: Path, version: int | None = None) -> VersionRecord | None:
    """One cached version; None when absent, or (logged) when damaged: a cache is never trusted blindly."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cache unreadable; ignoring it", path=str(path), error=exc.strerror or str(exc))
        return None
    try:
        return envelope.loads(raw, str(path), version)
    except StoreError as exc:
        log.warning("cache entry refused; ignoring it", path=str(path), error=str(exc))
        return None
