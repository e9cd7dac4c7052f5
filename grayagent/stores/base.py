"""The Store protocol (current, get, history, publish, watch, close) and the optional FleetStatus and
RolloutState protocols. Each backend is one class (stores/file.py, etcd.py, nacos.py), with its parts in
modules beside it; the version envelope every backend writes is in stores/envelope.py.

A store holds immutable, numbered versions of one release's rule document and a pointer to the current one.
Versions count up from 1; version 0 means "nothing published yet". Stores do not validate documents:
the use cases do that before publishing, and agents do it again after reading (other tools may write).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from grayagent.errors import GrayagentError


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
    parent_digest: str = ""  # the parent's entry digest (stores/envelope.py); "" starts a chain


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

    def current_number(self) -> int:
        """The version the current pointer names (0: none), without reading or checking that version: what
        a publish compares against, even when the current entry itself is damaged."""

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


class RecordConflict(GrayagentError):
    """A named record changed since it was read (compare-and-set on its revision)."""

    exit_code = 3


class Leadership(Protocol):
    def held(self) -> bool:
        """Still the leader. False once the lock or lease may be lost: the holder must stop acting."""

    def release(self) -> None:
        """Give up leadership (idempotent)."""


@runtime_checkable
class RolloutState(Protocol):
    """Optional: stores that can keep the rollout controller's state and elect one controller.

    Records are small JSON objects addressed by name, written with compare-and-set on a revision
    (0 = the record does not exist), so a controller and a CLI request can never overwrite each other.
    """

    def read_record(self, name: str) -> tuple[dict[str, Any] | None, int]:
        """(record, revision); (None, 0) when absent."""

    def write_record(self, name: str, record: dict[str, Any], expected: int) -> int:
        """Store `record` if its revision is still `expected`; the new revision. Raises RecordConflict."""

    def record_names(self) -> list[str]:
        """Every record's name, sorted."""

    def acquire_leadership(self, holder: str) -> Leadership | None:
        """Become the one controller without waiting; None when another holder leads."""
