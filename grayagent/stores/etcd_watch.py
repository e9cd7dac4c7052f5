"""The etcd store's watch and its in-memory mirror of `current` (grayagent/stores/etcd.py).

pyetcd's client never re-subscribes a broken watch and ignores cancellation (docs/notes/etcd-probe.md): this
watch resumes from the last revision seen, re-lists after compaction, and is cancelled promptly on stop.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import structlog
from pyetcd.etcdrpc import rpc_pb2 as pb
from pyetcd.etcdrpc import rpc_pb2_grpc as pbg

from grayagent.errors import StoreError, VersionNotFound
from grayagent.stores.base import VersionRecord, WatchHandler
from grayagent.stores.etcd_client import EtcdClient, details, prefix_end, status_code
from grayagent.text import is_decimal

log = structlog.get_logger("grayagent.etcd")


class EtcdWatch:
    """One store's watch loop, and the mirror `current()` answers from while the stream is live."""

    def __init__(self, client: EtcdClient, prefix: str, decode: Callable[[int, Any], VersionRecord],
                 get: Callable[[int], VersionRecord]) -> None:
        self.client = client
        self.url = client.url
        self.prefix = prefix
        self._decode = decode
        self._get = get
        # The pointer and the versions the watch delivered; None when no watch is live.
        self._mirror_lock = threading.Lock()
        self._mirror_current: int | None = None
        self._mirror_versions: dict[int, VersionRecord] = {}

    def run(self, handler: WatchHandler, stop: threading.Event) -> None:
        """Watch `current` and `versions/` from the last revision seen; re-list after reconnects and compaction.

        While the stream is live, the pointer and the versions it delivers are mirrored in memory and
        `current()` answers from the mirror: a publish then costs an agent no extra round trip, which is
        what lets hundreds of agents in one process converge in well under a second.
        """
        last_revision: int | None = None
        delay = 0.2
        try:
            while not stop.is_set():
                try:
                    if last_revision is None:
                        last_revision = self.relist()
                        handler.changed()
                    handler.store_state(True)
                    for item in self._watch_stream(last_revision + 1, stop):
                        if item is None:
                            log.warning("watch start revision compacted; re-reading", store=self.url,
                                        revision=last_revision)
                            last_revision = None
                            break
                        revision, events = item
                        last_revision = max(last_revision, revision)
                        if events and self._apply_events(events):
                            handler.changed()
                        delay = 0.2
                    else:
                        if not stop.is_set():  # the server ended the stream: back off, then resume
                            raise StoreError(f"{self.url}: watch stream ended")
                except (StoreError, grpc.RpcError) as exc:
                    self.invalidate()
                    if stop.is_set():
                        break
                    detail = str(exc) if isinstance(exc, StoreError) else details(exc)
                    handler.store_state(False, detail)
                    self.client.conn.fail_over(None)
                    stop.wait(delay * random.uniform(0.5, 1.5))
                    delay = min(delay * 2, 10.0)
        finally:
            self.invalidate()

    def relist(self) -> int:
        """Read the pointer and its version at one revision; seed the mirror; return that revision."""
        listing = self.client.range(self.prefix + "current")
        revision = int(listing.header.revision)
        number = 0
        if listing.kvs:
            text = listing.kvs[0].value.decode("ascii", "replace").strip()
            number = int(text) if is_decimal(text) else -1
        record = None
        if number > 0:
            with contextlib.suppress(VersionNotFound):
                record = self._get(number)
        with self._mirror_lock:
            self._mirror_versions = {number: record} if record is not None else {}
            self._mirror_current = number if number >= 0 and (number == 0 or record is not None) else None
        return revision

    def _apply_events(self, events: list[Any]) -> bool:
        """Apply watch events to the mirror; True when the current pointer moved."""
        moved = False
        with self._mirror_lock:
            for event in events:
                key = event.kv.key.decode("utf-8", "replace")[len(self.prefix):]
                deleted = event.type == 1  # mvccpb.Event.DELETE
                if key == "current":
                    text = event.kv.value.decode("ascii", "replace").strip()
                    self._mirror_current = 0 if deleted else (int(text) if is_decimal(text) else None)
                    moved = True
                elif key.startswith("versions/") and is_decimal(key[9:]):
                    number = int(key[9:])
                    if deleted:
                        self._mirror_versions.pop(number, None)
                    else:
                        try:
                            self._mirror_versions[number] = self._decode(number, event.kv)
                        except StoreError:
                            self._mirror_versions.pop(number, None)  # current() re-reads and reports it
            if self._mirror_current:
                # keep only what current() can still be asked for
                keep = self._mirror_current
                self._mirror_versions = {n: r for n, r in self._mirror_versions.items() if n >= keep}
        return moved

    def invalidate(self) -> None:
        with self._mirror_lock:
            self._mirror_current = None
            self._mirror_versions = {}

    def from_mirror(self) -> tuple[bool, VersionRecord | None]:
        with self._mirror_lock:
            number = self._mirror_current
            if number is None:
                return False, None
            if number == 0:
                return True, None
            record = self._mirror_versions.get(number)
            return (record is not None), record

    def _watch_stream(self, start: int, stop: threading.Event) -> Iterator[tuple[int, list[Any]] | None]:
        """Yield (revision, events) per watch response, or None when `start` was compacted.

        Watches [prefix/current, end of prefix): the pointer and versions/, but not agents/, so fleet
        status writes wake nobody. Ends when the stream breaks; cancelled promptly when `stop` is set.
        """
        done = threading.Event()
        calls: list[Any] = []

        def requests() -> Iterator[Any]:
            yield pb.WatchRequest(create_request=pb.WatchCreateRequest(
                key=(self.prefix + "current").encode(), range_end=prefix_end(self.prefix.encode()),
                start_revision=start, progress_notify=True))
            # gRPC drains this iterator on its own thread: use it to cancel the call on stop.
            while not done.is_set():
                if stop.wait(0.2):
                    if calls:
                        calls[0].cancel()
                    return

        channel = self.client.conn.channel()
        call = pbg.WatchStub(channel).Watch(requests(), metadata=self.client.conn.metadata())
        calls.append(call)
        try:
            for response in call:
                if response.compact_revision:
                    yield None
                    return
                if response.canceled:
                    reason = response.cancel_reason or "canceled by the server"
                    if "token" in reason or "permission" in reason:
                        self.client.conn.metadata(refresh=True)
                    raise StoreError(f"{self.url}: watch: {reason}")
                if response.created:
                    continue
                yield int(response.header.revision), list(response.events)
        except grpc.RpcError as exc:
            if not stop.is_set() and status_code(exc) != grpc.StatusCode.CANCELLED:
                raise
        finally:
            done.set()
            call.cancel()
