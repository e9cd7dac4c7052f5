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
  rollouts/<name> rollout records, compare-and-set on their mod_revision; rollouts/.leader: the leading
                  controller, on a lease

Client: the gRPC stubs and protobufs generated in `etcd-sdk-python` (module pyetcd), driven directly.
pyetcd's own client parks an endpoint for 300 s after one UNAVAILABLE, never re-subscribes a broken
watch, ignores watch cancellation and never refreshes an expired auth token (docs/notes/etcd-probe.md);
a gateway agent must survive all of those, so grayagent owns connection, retry, auth and watch logic:
etcd_client.py (channels, failover, retries, auth, leases), etcd_watch.py (the watch and its mirror of
`current`), etcd_fleet.py (agents/<host> on a lease). This module keeps versions, publishing, rollout
records and leadership.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

from pyetcd.etcdrpc import rpc_pb2 as pb

from grayagent.errors import Conflict, StoreError, VersionNotFound
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
from grayagent.stores.etcd_client import EtcdClient, EtcdConfig, parse_url
from grayagent.stores.etcd_fleet import EtcdFleetStatus
from grayagent.stores.etcd_watch import EtcdWatch
from grayagent.text import is_decimal

LEADER_LEASE_TTL = 6   # rollout controller leadership: a dead leader is replaced within this many seconds
LEADER_KEY = ".leader"


class EtcdStore:
    """Versions, the pointer and rollout records; the watch (etcd_watch) and fleet status (etcd_fleet) are
    parts of their own, and every call goes through one EtcdClient (etcd_client): retries, failover, auth."""

    def __init__(self, url: str) -> None:
        self.config = parse_url(url)
        self.url = self.config.redacted_url
        self.prefix = self.config.prefix
        self._client = EtcdClient(self.config)
        self._watch = EtcdWatch(self._client, self.prefix, self._decode, self.get)
        self._fleet = EtcdFleetStatus(self._client, self.prefix)

    def _range(self, key: str, prefix: bool = False, keys_only: bool = False) -> Any:
        return self._client.range(key, prefix, keys_only)

    # ------------------------------------------------------------------ reading

    def _current_number(self) -> int:
        response = self._range(self.prefix + "current")
        if not response.kvs:
            return 0
        text = response.kvs[0].value.decode("ascii", "replace").strip()
        if not is_decimal(text):
            raise StoreError(f"{self.url}: {self.prefix}current holds {text[:20]!r}, not a version number")
        return int(text)

    def _decode(self, version: int, kv: Any) -> VersionRecord:
        raw: bytes = kv.value
        try:
            data = loads_json(raw)
        except ValueError:
            data = None
        if envelope.is_envelope(data):
            return envelope.decode(data, f"{self.url}: versions/{version}", version)
        # A bare document written by another tool (etcdctl put): derive what the envelope would have said.
        meta = VersionMeta(version, 0, "", "written directly to etcd", f"etcd mod_revision {kv.mod_revision}",
                           digest_of(raw))
        return VersionRecord(meta, raw)

    def current_number(self) -> int:
        return self._current_number()

    def current(self) -> VersionRecord | None:
        live, record = self._watch.from_mirror()
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
            name = kv.key.decode("utf-8", "replace").rsplit("/", 1)[-1]
            if is_decimal(name):  # a key another tool wrote, e.g. versions/², is not ours
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
            numbers = [int(n) for kv in existing.kvs
                       if is_decimal(n := kv.key.decode("utf-8", "replace").rsplit("/", 1)[-1])]
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
            try:
                response = self._client.txn(request, "publish")
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
            return bool(loads_json(response.kvs[0].value).get("publish_id") == nonce)
        except ValueError:
            return False

    # ------------------------------------------------------------------ watching

    def watch(self, handler: WatchHandler, stop: threading.Event) -> None:
        """Watch `current` and `versions/` from the last revision seen; re-list after reconnects and compaction.

        While the stream is live, the pointer and the versions it delivers are mirrored in memory and
        `current()` answers from the mirror: a publish then costs an agent no extra round trip, which is
        what lets hundreds of agents in one process converge in well under a second.
        """
        self._watch.run(handler, stop)

    # ------------------------------------------------------------------ fleet status

    def report(self, host: str, status: dict[str, Any]) -> None:
        """Write agents/<host> under a lease that a background thread keeps alive."""
        self._fleet.report(host, status)

    def fleet(self) -> list[dict[str, Any]]:
        return self._fleet.fleet()

    # ------------------------------------------------------------------ rollout state

    def read_record(self, name: str) -> tuple[dict[str, Any] | None, int]:
        response = self._range(f"{self.prefix}rollouts/{name}")
        if not response.kvs:
            return None, 0
        try:
            record: dict[str, Any] = loads_json(response.kvs[0].value)
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
        response = self._client.txn(request, f"write rollouts/{name}", attempts=1)
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
        lease = self._client.lease_grant(LEADER_LEASE_TTL)
        key = f"{self.prefix}rollouts/{LEADER_KEY}".encode()
        request = pb.TxnRequest(
            compare=[pb.Compare(key=key, target=pb.Compare.VERSION, result=pb.Compare.EQUAL, version=0)],
            success=[pb.RequestOp(request_put=pb.PutRequest(key=key, value=holder.encode(), lease=lease))])
        response = self._client.txn(request, "leader election", attempts=1)
        if not response.succeeded:
            self._revoke(lease)
            return None
        return _LeaseLeadership(self, lease, sent)

    def _revoke(self, lease: int) -> None:
        self._client.revoke(lease)

    def _keepalive_once(self, lease: int) -> bool:
        """One keepalive; False when the lease is gone or etcd did not answer."""
        try:
            return self._client.lease_keepalive(lease, "leader lease keepalive", attempts=1) > 0
        except StoreError:
            return False

    def close(self) -> None:
        self._fleet.close()
        self._client.conn.close()


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


__all__ = ["EtcdConfig", "EtcdStore", "parse_url"]
