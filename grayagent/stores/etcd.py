"""The etcd v3 store.

URL:  etcd://host:2379[,host2:2379...]/grayagent/<release>[?options]   (etcds:// for TLS)
  ca=PATH  cert=PATH  key=PATH   TLS: CA bundle, client certificate and key (any of them implies TLS)
  user=NAME                      etcd user; the password comes from password_file=PATH or $GRAYAGENT_ETCD_PASSWORD
  timeout=SECONDS                per-call deadline (default 5)
Passwords in the URL itself are refused: URLs end up in shell history, logs and audit entries.

Layout under the prefix (stable; other tools may read and write it):
  versions/<N>    immutable; the version envelope (stores/envelope.py) with "publish_id", or a bare rule
                  document written by another tool (its metadata is then derived; it starts a chain)
  current         the current version number, as decimal text
  agents/<host>   JSON status of each agent, attached to a lease so it vanishes when the agent dies

Client: the gRPC stubs and protobufs generated in `etcd-sdk-python` (module pyetcd), driven directly.
pyetcd's own client parks an endpoint for 300 s after one UNAVAILABLE, never re-subscribes a broken
watch, ignores watch cancellation and never refreshes an expired auth token (docs/notes/etcd-probe.md);
a gateway agent must survive all of those, so this module owns connection, retry, auth and watch logic.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import structlog
from pyetcd.etcdrpc import rpc_pb2 as pb
from pyetcd.etcdrpc import rpc_pb2_grpc as pbg

from grayagent.errors import Conflict, StoreError, UsageError, VersionNotFound
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
from grayagent.stores.urls import parse_store_url

log = structlog.get_logger("grayagent.etcd")
T = TypeVar("T")

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.UNKNOWN}
GRPC_OPTIONS = [
    # Notice a hung member within seconds rather than minutes (etcd allows pings every 5 s).
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.http2.ping_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
AGENT_LEASE_TTL = 15
PASSWORD_ENV = "GRAYAGENT_ETCD_PASSWORD"  # noqa: S105 - the variable's name, not a password
LEADER_LEASE_TTL = 6   # rollout controller leadership: a dead leader is replaced within this many seconds
LEADER_KEY = ".leader"


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...]
    prefix: str
    tls: bool
    ca: Path | None
    cert: Path | None
    key: Path | None
    user: str | None
    password: str | None
    timeout: float

    @property
    def redacted_url(self) -> str:
        scheme = "etcds" if self.tls else "etcd"
        user = f"{self.user}@" if self.user else ""
        return f"{scheme}://{user}{','.join(self.endpoints)}{self.prefix.rstrip('/')}"


def parse_url(url: str) -> EtcdConfig:
    parsed = parse_store_url(url, example="etcd://host:2379[,host2:2379]/grayagent/<release>",
                             password_env=PASSWORD_ENV, options=frozenset({"ca", "cert", "key"}))
    where = parsed.where
    if not parsed.path:
        raise UsageError(f"{where}: name the release prefix, e.g. etcd://host:2379/grayagent/shop")
    files = {k: Path(v) for k, v in parsed.options.items() if v}
    for name, path in files.items():
        if not path.is_file():
            raise UsageError(f"{where}: {name}: {path} does not exist")
    if ("cert" in files) != ("key" in files):
        raise UsageError(f"{where}: cert and key go together")
    return EtcdConfig(parsed.endpoints, f"/{parsed.path}/", parsed.scheme == "etcds" or bool(files),
                      files.get("ca"), files.get("cert"), files.get("key"), parsed.user, parsed.password,
                      parsed.timeout)


def _status_code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(exc, "code", None)
    return code() if callable(code) else None


def _details(exc: grpc.RpcError) -> str:
    details = getattr(exc, "details", None)
    return str(details()) if callable(details) else str(exc)


class _Connection:
    """Channels to the endpoints, failover between them, and the auth token. Thread-safe."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._index = random.randrange(len(config.endpoints))  # spread a fleet's agents over the members
        self._channel: grpc.Channel | None = None
        self._token: str | None = None
        self._closed = False

    def _credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(self.config.ca), read(self.config.key), read(self.config.cert))

    def channel(self) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise StoreError(f"{self.config.redacted_url}: store closed")
            if self._channel is None:
                target = self.config.endpoints[self._index]
                self._channel = (grpc.secure_channel(target, self._credentials(), GRPC_OPTIONS) if self.config.tls
                                 else grpc.insecure_channel(target, GRPC_OPTIONS))
            return self._channel

    def fail_over(self, broken: grpc.Channel | None) -> None:
        with self._lock:
            if broken is not None and broken is not self._channel:
                return  # another thread already moved on
            if self._channel is not None:
                self._channel.close()
            self._channel = None
            self._index = (self._index + 1) % len(self.config.endpoints)

    def metadata(self, refresh: bool = False) -> tuple[tuple[str, str], ...]:
        """Call metadata: the auth token (fetched or refreshed as needed) and hasleader, so a member cut
        off from quorum fails calls at once instead of hanging."""
        base: tuple[tuple[str, str], ...] = (("hasleader", "true"),)
        if not self.config.user:
            return base
        with self._lock:
            token = None if refresh else self._token
        if token is None:
            stub = pbg.AuthStub(self.channel())
            response = stub.Authenticate(pb.AuthenticateRequest(name=self.config.user,
                                                                password=self.config.password or ""),
                                         timeout=self.config.timeout)
            token = str(response.token)
            with self._lock:
                self._token = token
        return (*base, ("token", token))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._channel is not None:
                self._channel.close()
                self._channel = None


class EtcdStore:
    def __init__(self, url: str) -> None:
        self.config = parse_url(url)
        self.url = self.config.redacted_url
        self.prefix = self.config.prefix
        self._conn = _Connection(self.config)
        self._lease_id: int | None = None
        self._lease_lock = threading.Lock()
        self._keepalive_stop = threading.Event()
        self._keepalive: threading.Thread | None = None
        # The watch's mirror of `current` and the versions it delivered; None when no watch is live.
        self._mirror_lock = threading.Lock()
        self._mirror_current: int | None = None
        self._mirror_versions: dict[int, VersionRecord] = {}

    # ------------------------------------------------------------------ calls with retry

    def _call(self, fn: Callable[[grpc.Channel, tuple[tuple[str, str], ...]], T], what: str,
              attempts: int = 6) -> T:
        """Run one RPC; on a transport error fail over to the next endpoint and retry with jittered backoff;
        on an expired token authenticate again."""
        delay = 0.1
        refresh = False
        last = ""
        for attempt in range(attempts):
            channel = self._conn.channel()
            try:
                return fn(channel, self._conn.metadata(refresh))
            except grpc.RpcError as exc:
                code = _status_code(exc)
                last = f"{code.name if code else 'error'}: {_details(exc)}"
                if code == grpc.StatusCode.UNAUTHENTICATED and "token" in _details(exc) and not refresh:
                    refresh = True  # tokens expire (--auth-token-ttl); get a new one and retry
                    continue
                if code not in RETRYABLE:
                    raise StoreError(f"{self.url}: {what}: {last}") from None
                self._conn.fail_over(channel)
                refresh = False
            if attempt < attempts - 1:
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 2.0)
        raise StoreError(f"{self.url}: {what}: unreachable after {attempts} attempts ({last})")

    def _range(self, key: str, prefix: bool = False, keys_only: bool = False) -> Any:
        request = pb.RangeRequest(key=key.encode(), keys_only=keys_only)
        if prefix:
            request.range_end = _prefix_end(key.encode())
        return self._call(lambda ch, md: pbg.KVStub(ch).Range(request, timeout=self.config.timeout, metadata=md),
                          f"read {key}")

    # ------------------------------------------------------------------ reading

    def _current_number(self) -> int:
        response = self._range(self.prefix + "current")
        if not response.kvs:
            return 0
        text = response.kvs[0].value.decode("ascii", "replace").strip()
        if not text.isdigit():
            raise StoreError(f"{self.url}: {self.prefix}current holds {text[:20]!r}, not a version number")
        return int(text)

    def _decode(self, version: int, kv: Any) -> VersionRecord:
        raw: bytes = kv.value
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if envelope.is_envelope(data):
            return envelope.decode(data, f"{self.url}: versions/{version}", version)
        # A bare document written by another tool (etcdctl put): derive what the envelope would have said.
        meta = VersionMeta(version, 0, "", "written directly to etcd", f"etcd mod_revision {kv.mod_revision}",
                           digest_of(raw))
        return VersionRecord(meta, raw)

    def current(self) -> VersionRecord | None:
        live, record = self._from_mirror()
        if live:
            return record
        number = self._current_number()
        return self.get(number) if number else None

    def get(self, version: int) -> VersionRecord:
        response = self._range(f"{self.prefix}versions/{version}")
        if not response.kvs:
            raise VersionNotFound(f"version {version} does not exist in {self.url}")
        return self._decode(version, response.kvs[0])

    def history(self) -> list[VersionMeta]:
        response = self._range(self.prefix + "versions/", prefix=True)
        records = []
        for kv in response.kvs:
            name = kv.key.decode().rsplit("/", 1)[-1]
            if name.isdigit():
                records.append(self._decode(int(name), kv).meta)
        return sorted(records, key=lambda m: m.version)

    # ------------------------------------------------------------------ publishing

    def publish(self, content: bytes, expected: int, author: str, message: str) -> VersionMeta:
        envelope.require_utf8(content)
        nonce = uuid.uuid4().hex  # recognises our own write if a retried transaction already committed
        current_key = (self.prefix + "current").encode()
        parent_digest = envelope.parent_link(self.get, expected)
        for _ in range(10):
            existing = self._range(self.prefix + "versions/", prefix=True, keys_only=True)
            numbers = [int(n) for kv in existing.kvs if (n := kv.key.decode().rsplit("/", 1)[-1]).isdigit()]
            number = max([expected, *numbers]) + 1
            meta = VersionMeta(number, expected, utc_now(), author, message, digest_of(content), parent_digest)
            entry = envelope.encode(meta, content, publish_id=nonce)
            version_key = f"{self.prefix}versions/{number}".encode()
            if expected == 0:
                pointer_holds = pb.Compare(key=current_key, target=pb.Compare.VERSION, result=pb.Compare.EQUAL,
                                           version=0)
            else:
                pointer_holds = pb.Compare(key=current_key, target=pb.Compare.VALUE, result=pb.Compare.EQUAL,
                                           value=str(expected).encode())
            request = pb.TxnRequest(
                compare=[pointer_holds, pb.Compare(key=version_key, target=pb.Compare.VERSION,
                                                   result=pb.Compare.EQUAL, version=0)],
                success=[pb.RequestOp(request_put=pb.PutRequest(key=version_key, value=entry)),
                         pb.RequestOp(request_put=pb.PutRequest(key=current_key, value=str(number).encode()))])
            def txn(ch: grpc.Channel, md: tuple[tuple[str, str], ...], r: Any = request) -> Any:
                return pbg.KVStub(ch).Txn(r, timeout=self.config.timeout, metadata=md)

            try:
                response = self._call(txn, "publish")
                if response.succeeded:
                    return meta
            except StoreError:
                if self._committed(number, nonce):
                    return meta
                raise
            if self._committed(number, nonce):
                return meta
            actual = self._current_number()
            if actual != expected:
                raise Conflict(expected, actual)
            # versions/<number> was taken by another writer but the pointer did not move: try the next number.
        raise StoreError(f"{self.url}: publish: could not find a free version number")

    def _committed(self, number: int, nonce: str) -> bool:
        try:
            response = self._range(f"{self.prefix}versions/{number}")
        except StoreError:
            return False
        if not response.kvs:
            return False
        try:
            return bool(json.loads(response.kvs[0].value).get("publish_id") == nonce)
        except ValueError:
            return False

    # ------------------------------------------------------------------ watching

    def watch(self, handler: WatchHandler, stop: threading.Event) -> None:
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
                        last_revision = self._relist()
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
                        if events and self._mirror_events(events):
                            handler.changed()
                        delay = 0.2
                    else:
                        if not stop.is_set():  # the server ended the stream: back off, then resume
                            raise StoreError(f"{self.url}: watch stream ended")
                except (StoreError, grpc.RpcError) as exc:
                    self._invalidate_mirror()
                    if stop.is_set():
                        break
                    detail = str(exc) if isinstance(exc, StoreError) else _details(exc)
                    handler.store_state(False, detail)
                    self._conn.fail_over(None)
                    stop.wait(delay * random.uniform(0.5, 1.5))
                    delay = min(delay * 2, 10.0)
        finally:
            self._invalidate_mirror()

    def _relist(self) -> int:
        """Read the pointer and its version at one revision; seed the mirror; return that revision."""
        listing = self._range(self.prefix + "current")
        revision = int(listing.header.revision)
        number = 0
        if listing.kvs:
            text = listing.kvs[0].value.decode("ascii", "replace").strip()
            number = int(text) if text.isdigit() else -1
        record = None
        if number > 0:
            with contextlib.suppress(VersionNotFound):
                record = self.get(number)
        with self._mirror_lock:
            self._mirror_versions = {number: record} if record is not None else {}
            self._mirror_current = number if number >= 0 and (number == 0 or record is not None) else None
        return revision

    def _mirror_events(self, events: list[Any]) -> bool:
        """Apply watch events to the mirror; True when the current pointer moved."""
        moved = False
        with self._mirror_lock:
            for event in events:
                key = event.kv.key.decode("utf-8", "replace")[len(self.prefix):]
                deleted = event.type == 1  # mvccpb.Event.DELETE
                if key == "current":
                    text = event.kv.value.decode("ascii", "replace").strip()
                    self._mirror_current = 0 if deleted else (int(text) if text.isdigit() else None)
                    moved = True
                elif key.startswith("versions/") and key[9:].isdigit():
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

    def _invalidate_mirror(self) -> None:
        with self._mirror_lock:
            self._mirror_current = None
            self._mirror_versions = {}

    def _from_mirror(self) -> tuple[bool, VersionRecord | None]:
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
                key=(self.prefix + "current").encode(), range_end=_prefix_end(self.prefix.encode()),
                start_revision=start, progress_notify=True))
            # gRPC drains this iterator on its own thread: use it to cancel the call on stop.
            while not done.is_set():
                if stop.wait(0.2):
                    if calls:
                        calls[0].cancel()
                    return

        channel = self._conn.channel()
        call = pbg.WatchStub(channel).Watch(requests(), metadata=self._conn.metadata())
        calls.append(call)
        try:
            for response in call:
                if response.compact_revision:
                    yield None
                    return
                if response.canceled:
                    reason = response.cancel_reason or "canceled by the server"
                    if "token" in reason or "permission" in reason:
                        self._conn.metadata(refresh=True)
                    raise StoreError(f"{self.url}: watch: {reason}")
                if response.created:
                    continue
                yield int(response.header.revision), list(response.events)
        except grpc.RpcError as exc:
            if not stop.is_set() and _status_code(exc) != grpc.StatusCode.CANCELLED:
                raise
        finally:
            done.set()
            call.cancel()

    # ------------------------------------------------------------------ fleet status

    def report(self, host: str, status: dict[str, Any]) -> None:
        """Write agents/<host> under a lease that a background thread keeps alive."""
        with self._lease_lock:
            if self._lease_id is None:
                grant = self._call(lambda ch, md: pbg.LeaseStub(ch).LeaseGrant(
                    pb.LeaseGrantRequest(TTL=AGENT_LEASE_TTL), timeout=self.config.timeout, metadata=md),
                    "lease grant")
                self._lease_id = int(grant.ID)
                if self._keepalive is None:
                    self._keepalive = threading.Thread(target=self._keep_lease, name="etcd-lease", daemon=True)
                    self._keepalive.start()
            lease = self._lease_id
        request = pb.PutRequest(key=f"{self.prefix}agents/{host}".encode(),
                                value=json.dumps(status, sort_keys=True).encode(), lease=lease)
        try:
            self._call(lambda ch, md: pbg.KVStub(ch).Put(request, timeout=self.config.timeout, metadata=md),
                       "report status")
        except StoreError as exc:
            if "lease" in str(exc).lower():
                with self._lease_lock:
                    self._lease_id = None  # expired while we were cut off: grant a new one next time
            raise

    def _keep_lease(self) -> None:
        while not self._keepalive_stop.wait(AGENT_LEASE_TTL / 3):
            with self._lease_lock:
                lease = self._lease_id
            if lease is None:
                continue
            try:
                def keepalive(ch: grpc.Channel, md: tuple[tuple[str, str], ...], lease_id: int = lease) -> Any:
                    responses = pbg.LeaseStub(ch).LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=lease_id)]),
                                                                 timeout=self.config.timeout, metadata=md)
                    return next(iter(responses))
                answer = self._call(keepalive, "lease keepalive", attempts=2)
                if int(answer.TTL) <= 0:
                    with self._lease_lock:
                        self._lease_id = None
            except StoreError as exc:
                log.warning("lease keepalive failed", store=self.url, error=str(exc))

    def fleet(self) -> list[dict[str, Any]]:
        response = self._range(self.prefix + "agents/", prefix=True)
        out = []
        for kv in response.kvs:
            try:
                entry = json.loads(kv.value)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entry.setdefault("host", kv.key.decode().rsplit("/", 1)[-1])
                out.append(entry)
        return sorted(out, key=lambda e: str(e.get("host")))

    # ------------------------------------------------------------------ rollout state

    def read_record(self, name: str) -> tuple[dict[str, Any] | None, int]:
        response = self._range(f"{self.prefix}rollouts/{name}")
        if not response.kvs:
            return None, 0
        try:
            record: dict[str, Any] = json.loads(response.kvs[0].value)
        except ValueError:
            raise StoreError(f"{self.url}: rollouts/{name}: not JSON") from None
        return record, int(response.kvs[0].mod_revision)

    def write_record(self, name: str, record: dict[str, Any], expected: int) -> int:
        key = f"{self.prefix}rollouts/{name}".encode()
        unchanged = (pb.Compare(key=key, target=pb.Compare.VERSION, result=pb.Compare.EQUAL, version=0)
                     if expected == 0 else
                     pb.Compare(key=key, target=pb.Compare.MOD, result=pb.Compare.EQUAL, mod_revision=expected))
        request = pb.TxnRequest(compare=[unchanged], success=[pb.RequestOp(request_put=pb.PutRequest(
            key=key, value=json.dumps(record, sort_keys=True).encode()))])
        # attempts=1: a blind retry of a committed write would report a false conflict.
        response = self._call(lambda ch, md: pbg.KVStub(ch).Txn(request, timeout=self.config.timeout, metadata=md),
                              f"write rollouts/{name}", attempts=1)
        if not response.succeeded:
            raise RecordConflict(f"rollout record {name!r} changed since it was read")
        return int(response.header.revision)

    def record_names(self) -> list[str]:
        response = self._range(self.prefix + "rollouts/", prefix=True, keys_only=True)
        names = (kv.key.decode().rsplit("/", 1)[-1] for kv in response.kvs)
        return sorted(n for n in names if n and n != LEADER_KEY)

    def acquire_leadership(self, holder: str) -> Leadership | None:
        """Create rollouts/.leader under a fresh lease only if absent (one txn); keep the lease alive."""
        sent = time.monotonic()  # the lease's TTL runs from (at the latest) when etcd got the grant request
        grant = self._call(lambda ch, md: pbg.LeaseStub(ch).LeaseGrant(
            pb.LeaseGrantRequest(TTL=LEADER_LEASE_TTL), timeout=self.config.timeout, metadata=md), "lease grant")
        lease = int(grant.ID)
        key = f"{self.prefix}rollouts/{LEADER_KEY}".encode()
        request = pb.TxnRequest(
            compare=[pb.Compare(key=key, target=pb.Compare.VERSION, result=pb.Compare.EQUAL, version=0)],
            success=[pb.RequestOp(request_put=pb.PutRequest(key=key, value=holder.encode(), lease=lease))])
        response = self._call(lambda ch, md: pbg.KVStub(ch).Txn(request, timeout=self.config.timeout, metadata=md),
                              "leader election", attempts=1)
        if not response.succeeded:
            self._revoke(lease)
            return None
        return _LeaseLeadership(self, lease, sent)

    def _revoke(self, lease: int) -> None:
        with contextlib.suppress(StoreError):  # the lease expires by itself anyway
            self._call(lambda ch, md: pbg.LeaseStub(ch).LeaseRevoke(pb.LeaseRevokeRequest(ID=lease),
                                                                    timeout=2, metadata=md),
                       "lease revoke", attempts=1)

    def _keepalive_once(self, lease: int) -> bool:
        """One keepalive; False when the lease is gone or etcd did not answer."""
        def keepalive(ch: grpc.Channel, md: tuple[tuple[str, str], ...]) -> Any:
            responses = pbg.LeaseStub(ch).LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=lease)]),
                                                         timeout=self.config.timeout, metadata=md)
            return next(iter(responses))
        try:
            return int(self._call(keepalive, "leader lease keepalive", attempts=1).TTL) > 0
        except StoreError:
            return False

    def close(self) -> None:
        self._keepalive_stop.set()
        with self._lease_lock:
            lease, self._lease_id = self._lease_id, None
        if lease is not None:
            with contextlib.suppress(StoreError):  # the lease expires by itself anyway
                self._call(lambda ch, md: pbg.LeaseStub(ch).LeaseRevoke(pb.LeaseRevokeRequest(ID=lease),
                                                                        timeout=2, metadata=md),
                           "lease revoke", attempts=1)
        self._conn.close()


class _LeaseLeadership:
    """Leads while the lease is kept alive. It counts itself deposed after half the TTL without a successful
    keepalive, well before etcd could expire the lease and let another controller in."""

    def __init__(self, store: EtcdStore, lease: int, granted: float) -> None:
        self.store = store
        self.lease = lease
        # Monotonic time taken BEFORE each request that renewed the lease: etcd restarted the TTL no earlier
        # than that, so counting from it can only err on the safe side (a slow answer shortens our term).
        self._last_ok = granted
        self._lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="etcd-leader-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(LEADER_LEASE_TTL / 5):
            sent = time.monotonic()
            if self.store._keepalive_once(self.lease):
                self._last_ok = sent
            elif self._lost or time.monotonic() - self._last_ok > LEADER_LEASE_TTL / 2:
                self._lost = True  # never lead again on this lease: its key may already belong to another
                return

    def held(self) -> bool:
        return not self._lost and time.monotonic() - self._last_ok < LEADER_LEASE_TTL / 2

    def release(self) -> None:
        self._stop.set()
        self._lost = True
        self.store._revoke(self.lease)


def _prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with `prefix` (etcd's convention)."""
    trimmed = bytearray(prefix)
    while trimmed:
        if trimmed[-1] < 0xFF:
            trimmed[-1] += 1
            return bytes(trimmed)
        trimmed.pop()
    return b"\0"
