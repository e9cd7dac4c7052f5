"""The Store protocol: five methods, one backend per module.

A store holds immutable, numbered versions of one release's rule document and a pointer to the current one.
Versions count up from 1; version 0 means "nothing published yet". Stores do not validate documents:
the use cases do that before publishing, and agents do it again after reading (other tools may write).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable


def digest_of(content: bytes) -> str:
    return "sha256:" + hashlib.sha256(content).hexdigest()


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class VersionMeta:
    version: int
    parent: int
    created: str
    author: str
    message: str
    digest: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class VersionRecord:
    meta: VersionMeta
    content: bytes

    @property
    def version(self) -> int:
        return self.meta.version


class WatchHandler(Protocol):
    """What a watch reports to. Calls come from the watch's own thread."""

    def changed(self) -> None:
        """The current pointer may have moved: re-read `current()`. Spurious calls are allowed."""

    def store_state(self, reachable: bool, detail: str = "") -> None:
        """The store became reachable or unreachable; `detail` is a short reason, never a secret."""


@runtime_checkable
class Store(Protocol):
    url: str

    def current(self) -> VersionRecord | None:
        """The current version, or None when nothing was published."""

    def get(self, version: int) -> VersionRecord:
        """One version; raises VersionNotFound."""

    def history(self) -> list[VersionMeta]:
        """Every version, oldest first."""

    def publish(self, content: bytes, expected: int, author: str, message: str) -> VersionMeta:
        """Store a new version whose parent is `expected` and make it current, atomically.

        Raises Conflict when the current version is not `expected` (compare-and-set).
        """

    def watch(self, handler: WatchHandler, stop: threading.Event) -> None:
        """Block until `stop` is set, calling `handler.changed()` whenever current may have moved.

        Reconnects by itself (with jittered backoff) and reports reachability through `handler.store_state`.
        """

    def close(self) -> None:
        """Release connections."""


@runtime_checkable
class FleetStatus(Protocol):
    """Optional: stores that can hold each agent's status, for `grayagent status`."""

    def report(self, host: str, status: dict[str, object]) -> None:
        """Record this host's status; it disappears when the agent stops reporting."""

    def fleet(self) -> list[dict[str, object]]:
        """The live agents' statuses, sorted by host."""
