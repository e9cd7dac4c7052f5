"""Fleet status in etcd: each agent's status under agents/<host>, on a lease that expires when the agent dies."""

from __future__ import annotations

import json
import threading
from typing import Any

import structlog
from pyetcd.etcdrpc import rpc_pb2 as pb
from pyetcd.etcdrpc import rpc_pb2_grpc as pbg

from grayagent.errors import StoreError
from grayagent.rules.docload import loads_json
from grayagent.stores.etcd_client import EtcdClient

log = structlog.get_logger("grayagent.etcd")

AGENT_LEASE_TTL = 15


class EtcdFleetStatus:
    def __init__(self, client: EtcdClient, prefix: str) -> None:
        self.client = client
        self.url = client.url
        self.prefix = prefix
        self._lease_id: int | None = None
        self._lease_lock = threading.Lock()
        self._keepalive_stop = threading.Event()
        self._keepalive: threading.Thread | None = None

    def report(self, host: str, status: dict[str, Any]) -> None:
        """Write agents/<host> under a lease that a background thread keeps alive."""
        with self._lease_lock:
            if self._lease_id is None:
                self._lease_id = self.client.lease_grant(AGENT_LEASE_TTL)
                if self._keepalive is None:
                    self._keepalive = threading.Thread(target=self._keep_lease, name="etcd-lease", daemon=True)
                    self._keepalive.start()
            lease = self._lease_id
        request = pb.PutRequest(key=f"{self.prefix}agents/{host}".encode(),
                                value=json.dumps(status, sort_keys=True).encode(), lease=lease)
        try:
            timeout = self.client.config.timeout
            self.client.call(lambda ch, md: pbg.KVStub(ch).Put(request, timeout=timeout, metadata=md), "report status")
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
                if self.client.lease_keepalive(lease, "lease keepalive", attempts=2) <= 0:
                    with self._lease_lock:
                        self._lease_id = None
            except StoreError as exc:
                log.warning("lease keepalive failed", store=self.url, error=str(exc))

    def fleet(self) -> list[dict[str, Any]]:
        response = self.client.range(self.prefix + "agents/", prefix=True)
        out = []
        for kv in response.kvs:
            try:
                entry = loads_json(kv.value)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entry.setdefault("host", kv.key.decode().rsplit("/", 1)[-1])
                out.append(entry)
        return sorted(out, key=lambda e: str(e.get("host")))

    def close(self) -> None:
        """Stop the keepalive and revoke the lease, so this agent's entry goes at once."""
        self._keepalive_stop.set()
        with self._lease_lock:
            lease, self._lease_id = self._lease_id, None
        if lease is not None:
            self.client.revoke(lease)
