"""Fleet status in Nacos: one ephemeral naming instance per agent, its status JSON in the metadata."""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any

import structlog

from grayagent.errors import GrayagentError, StoreError
from grayagent.rules.docload import loads_json
from grayagent.stores.nacos_client import NacosConnection, SdkClient

log = structlog.get_logger("grayagent.nacos")

AGENT_PORT = 1                 # naming instances need a port; ours are status records, not endpoints
HEARTBEAT_SECONDS = 5.0        # Nacos marks an instance unhealthy after 15 s without beats, drops it at 30 s
STATUS_KEY = "grayagent.status"


class NacosFleetStatus:
    def __init__(self, conn: NacosConnection, agents_service: str) -> None:
        self.conn = conn
        self.url = conn.url
        self.agents_service = agents_service
        self._reported: tuple[str, dict[str, str]] | None = None  # (host, metadata) of the last report
        self._beat_lock = threading.Lock()
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None

    def report(self, host: str, status: dict[str, Any]) -> None:
        """Register (again) this host's ephemeral instance with its status; a thread sends its heartbeats.

        Why naming instances rather than a status dataId per host: they expire by themselves 15-30 s after the
        agent stops (like an etcd lease), and they add no row to Nacos's config history on every report (a
        config write does) nor leave dataIds behind for hosts that are gone. A server restart drops them:
        the next heartbeat (code 20404) or report registers the instance again.
        """
        entry = {**status, "host": host}
        if isinstance(entry.get("last_error"), str):
            entry["last_error"] = entry["last_error"][:1000]
        metadata = {STATUS_KEY: json.dumps(entry, sort_keys=True, default=str),
                    "applied_version": str(status.get("applied_version")),
                    "healthy": str(bool(status.get("healthy"))).lower()}
        with self._beat_lock:
            self._reported = (host, metadata)
            if self._beat_thread is None:
                # Our own heartbeat thread rather than the SDK's: it stops at once and can be joined, so no
                # heartbeat lands after close() removed the instance (a heartbeat re-creates a missing one).
                self._beat_thread = threading.Thread(target=self._beat, name="nacos-heartbeat", daemon=True)
                self._beat_thread.start()
        self._register(host, metadata)

    def _register(self, host: str, metadata: dict[str, str]) -> None:
        ok = self.conn.call("report status", lambda c: c.add_naming_instance(
            self.agents_service, host, AGENT_PORT, cluster_name="DEFAULT", metadata=metadata, ephemeral=True,
            group_name=self.conn.group))
        if not ok:
            raise StoreError(f"{self.url}: report status: the server did not accept the instance")

    def _beat(self) -> None:
        failing = False
        while not self._beat_stop.wait(HEARTBEAT_SECONDS):
            with self._beat_lock:
                reported = self._reported
            if reported is None:
                continue
            host, metadata = reported

            def beat(client: SdkClient, host: str = host, metadata: dict[str, str] = metadata) -> Any:
                return client.send_heartbeat(self.agents_service, host, AGENT_PORT, cluster_name="DEFAULT",
                                             metadata=metadata, group_name=self.conn.group)
            try:
                answer = self.conn.call("heartbeat", beat)
                if isinstance(answer, dict) and answer.get("code") == 20404:  # the server lost it (restart)
                    self._register(host, metadata)
                failing = False
            except GrayagentError as exc:
                if not failing:  # once per outage; the status reporter logs its own failures
                    log.warning("heartbeat failed", store=self.url, error=str(exc))
                failing = True

    def fleet(self) -> list[dict[str, Any]]:
        answer = self.conn.call("read fleet status", lambda c: c.list_naming_instance(
            self.agents_service, group_name=self.conn.group, healthy_only=False))
        out = []
        for instance in (answer.get("hosts") or []) if isinstance(answer, dict) else []:
            if not instance.get("healthy", False):
                continue  # no heartbeat for 15 s: the agent is gone (Nacos drops it at 30 s)
            try:
                entry = loads_json((instance.get("metadata") or {}).get(STATUS_KEY, ""))
            except ValueError:
                continue
            if isinstance(entry, dict):
                entry.setdefault("host", instance.get("ip"))
                out.append(entry)
        return sorted(out, key=lambda e: str(e.get("host")))

    def close(self) -> None:
        """Stop the heartbeats, then remove this agent's instance, so it leaves `fleet()` at once."""
        self._beat_stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(self.conn.config.timeout + 1)  # a heartbeat in flight lands before the removal
        client = self.conn.existing_sdk()
        if client is not None and self._reported is not None:
            with contextlib.suppress(Exception):  # the instance expires by itself anyway
                client.remove_naming_instance(self.agents_service, self._reported[0], AGENT_PORT,
                                              cluster_name="DEFAULT", ephemeral=True, group_name=self.conn.group)
