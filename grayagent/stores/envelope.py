"""The version envelope: how every store, and the agent's cache, writes one version as JSON.

    {"version", "parent", "created", "author", "message", "digest", "parent_digest", "content", ...}

`digest` is the sha256 of `content` (UTF-8). `parent_digest` chains the version to its parent: it is the
parent's `entry_digest` (a hash over the parent's whole envelope metadata, which includes the parent's own
`digest` and `parent_digest`), so editing any version, content or metadata, breaks the link from its child.
Versions written before the chain existed have no `parent_digest` (read as ""): each is the start of a
chain. Backends may add private keys (etcd and Nacos add "publish_id"); readers ignore unknown keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import structlog

from grayagent.errors import StoreError, VersionNotFound
from grayagent.rules.docload import loads_json
from grayagent.stores.base import VersionMeta, VersionRecord, digest_of

log = structlog.get_logger("grayagent.stores")

REQUIRED_KEYS = frozenset({"version", "digest", "content"})


class DamagedVersion(StoreError):
    """A stored version that does not read back as itself: malformed, another version's, or not its digest."""


def require_utf8(content: bytes) -> str:
    """Documents are stored as JSON strings, so they must be UTF-8 text."""
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        raise StoreError("documents must be UTF-8") from None


def encode(meta: VersionMeta, content: bytes, *, indent: int | None = None, **extra: str) -> bytes:
    """The envelope of one version, with backend-private `extra` keys."""
    entry = {**meta.as_dict(), "content": require_utf8(content), **extra}
    return json.dumps(entry, ensure_ascii=False, indent=indent).encode("utf-8")


def is_envelope(data: Any) -> bool:
    """Whether decoded JSON is an envelope rather than a bare rule document written by another tool."""
    return isinstance(data, dict) and data.keys() >= REQUIRED_KEYS


# Version numbers stay exact in every consumer, LuaJIT's doubles included.
MAX_VERSION = 2**53 - 1


def _number(value: Any) -> int:
    """A version number as grayagent writes it: a JSON integer (not "2", 2.0 or true), 0 to MAX_VERSION."""
    if type(value) is not int or not 0 <= value <= MAX_VERSION:
        raise ValueError(value)
    return value


def meta_of(data: dict[str, Any], where: str) -> VersionMeta:
    """An envelope's metadata, unchecked against its content (for listings)."""
    try:
        return VersionMeta(_number(data["version"]), _number(data.get("parent", 0)), str(data.get("created", "")),
                           str(data.get("author", "")), str(data.get("message", "")), str(data["digest"]),
                           str(data.get("parent_digest") or ""))
    except (KeyError, TypeError, ValueError):
        raise DamagedVersion(f"{where}: malformed version envelope") from None


def decode(data: dict[str, Any], where: str, version: int | None = None) -> VersionRecord:
    """The record an envelope holds, checked: well-formed, the expected version, content matching its digest.

    `where` names the entry in errors (a file, a key, a dataId); `version` is the number it is stored under.
    """
    meta = meta_of(data, where)
    content = str(data["content"]).encode("utf-8")
    if version is not None and meta.version != version:
        raise DamagedVersion(f"{where}: holds version {meta.version}, not {version}")
    if digest_of(content) != meta.digest:
        raise DamagedVersion(f"{where}: content does not match its digest")
    return VersionRecord(meta, content)


def loads(raw: bytes | str, where: str, version: int | None = None) -> VersionRecord:
    """decode() of raw JSON text; not JSON, or not an envelope, is a StoreError."""
    try:
        data = loads_json(raw)
    except ValueError as exc:
        raise DamagedVersion(f"{where}: unreadable version entry: {exc}") from None
    if not is_envelope(data):
        raise DamagedVersion(f"{where}: not a version envelope")
    return decode(data, where, version)


def entry_digest(meta: VersionMeta) -> str:
    """The hash a child's `parent_digest` names: over every metadata field, in a canonical form."""
    canonical = json.dumps(meta.as_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def parent_link(get: Callable[[int], VersionRecord], parent: int) -> str:
    """The `parent_digest` for a new version on `parent` (0: none).

    A parent that is missing or damaged cannot be vouched for: the new version starts a chain, so that a
    revert can still be published in an incident, and `history --verify` keeps reporting the damaged
    version itself. Any other error (the store unreachable) fails the publish: a link must not be dropped
    for a transient reason."""
    if parent <= 0:
        return ""
    try:
        return entry_digest(get(parent).meta)
    except (VersionNotFound, DamagedVersion) as exc:
        log.warning("parent version cannot be vouched for; the new version starts a chain", error=str(exc))
        return ""
