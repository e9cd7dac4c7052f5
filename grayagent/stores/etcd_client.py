"""etcd connection, failover, auth and retries, for the etcd store (grayagent/stores/etcd.py).

pyetcd's own client parks an endpoint for 300 s after one UNAVAILABLE and never refreshes an expired auth
token (docs/notes/etcd-probe.md), so this module drives pyetcd's generated gRPC stubs itself: one channel at
a time, failover to the next endpoint on transport errors, jittered backoff, and a fresh token on expiry.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from pyetcd.etcdrpc import rpc_pb2 as pb
from pyetcd.etcdrpc import rpc_pb2_grpc as pbg

from grayagent.errors import StoreError, UsageError
from grayagent.stores.urls import parse_store_url

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]

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
PASSWORD_ENV = "GRAYAGENT_ETCD_PASSWORD"  # noqa: S105 - the variable's name, not a password


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


def status_code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(exc, "code", None)
    return code() if callable(code) else None


def details(exc: grpc.RpcError) -> str:
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


class EtcdClient:
    """RPCs with retry over one _Connection: what every part of the etcd store calls through."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self.url = config.redacted_url
        self.conn = _Connection(config)

    def call(self, fn: Callable[[grpc.Channel, Metadata], T], what: str, attempts: int = 6) -> T:
        """Run one RPC; on a transport error fail over to the next endpoint and retry with jittered backoff;
        on an expired token authenticate again."""
        delay = 0.1
        refresh = False
        last = ""
        for attempt in range(attempts):
            channel = self.conn.channel()
            try:
                return fn(channel, self.conn.metadata(refresh))
            except grpc.RpcError as exc:
                code = status_code(exc)
                last = f"{code.name if code else 'error'}: {details(exc)}"
                if code == grpc.StatusCode.UNAUTHENTICATED and "token" in details(exc) and not refresh:
                    refresh = True  # tokens expire (--auth-token-ttl); get a new one and retry
                    continue
                if code not in RETRYABLE:
                    raise StoreError(f"{self.url}: {what}: {last}") from None
                self.conn.fail_over(channel)
                refresh = False
            if attempt < attempts - 1:
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 2.0)
        raise StoreError(f"{self.url}: {what}: unreachable after {attempts} attempts ({last})")

    def range(self, key: str, prefix: bool = False, keys_only: bool = False) -> Any:
        request = pb.RangeRequest(key=key.encode(), keys_only=keys_only)
        if prefix:
            request.range_end = prefix_end(key.encode())
        return self.call(lambda ch, md: pbg.KVStub(ch).Range(request, timeout=self.config.timeout, metadata=md),
                          f"read {key}")

    def txn(self, request: Any, what: str, attempts: int = 6) -> Any:
        return self.call(lambda ch, md: pbg.KVStub(ch).Txn(request, timeout=self.config.timeout, metadata=md),
                         what, attempts)

    def lease_grant(self, ttl: int) -> int:
        grant = self.call(lambda ch, md: pbg.LeaseStub(ch).LeaseGrant(
            pb.LeaseGrantRequest(TTL=ttl), timeout=self.config.timeout, metadata=md), "lease grant")
        return int(grant.ID)

    def lease_keepalive(self, lease: int, what: str, attempts: int) -> int:
        """One keepalive; the lease's remaining TTL (0 or less: it is gone)."""
        def keepalive(ch: grpc.Channel, md: Metadata) -> Any:
            responses = pbg.LeaseStub(ch).LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=lease)]),
                                                         timeout=self.config.timeout, metadata=md)
            return next(iter(responses))
        return int(self.call(keepalive, what, attempts=attempts).TTL)

    def revoke(self, lease: int) -> None:
        """Revoke a lease, best effort: it expires by itself anyway."""
        with contextlib.suppress(StoreError):
            self.call(lambda ch, md: pbg.LeaseStub(ch).LeaseRevoke(pb.LeaseRevokeRequest(ID=lease), timeout=2,
                                                                   metadata=md),
                      "lease revoke", attempts=1)


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with `prefix` (etcd's convention)."""
    trimmed = bytearray(prefix)
    while trimmed:
        if trimmed[-1] < 0xFF:
            trimmed[-1] += 1
            return bytes(trimmed)
        trimmed.pop()
    return b"\0"
