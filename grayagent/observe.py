"""The agent's /metrics (Prometheus text format, prometheus-client), /healthz and /status, on loopback by default.

Health is defined once, in grayagent/health.py. /healthz answers 200 only in the `healthy` state, otherwise
503; its body, /status and the `grayagent_healthy` / `grayagent_health_state` gauges show the same state
and reason. The bodies carry no secrets (store URLs are already redacted).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from grayagent.health import State

STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class AgentMetrics:
    """Everything the agent counts; one registry per agent so tests can run several in one process."""

    def __init__(self, target: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"target": target}
        self.applied_version = Gauge("grayagent_applied_version", "Version the proxy serves (0: none yet).",
                                     list(labels), registry=self.registry).labels(**labels)
        self.desired_version = Gauge("grayagent_desired_version", "The store's current version.",
                                     list(labels), registry=self.registry).labels(**labels)
        self._applies = Counter("grayagent_apply", "Apply attempts by result (ok, failed, refused).",
                                ["target", "result"], registry=self.registry)
        self._steps = Histogram("grayagent_apply_step_seconds", "Time spent in each apply step.",
                                ["target", "step"], buckets=STEP_BUCKETS, registry=self.registry)
        self.reloads = Counter("grayagent_proxy_reloads", "Proxy reloads (or config pushes) performed.",
                               list(labels), registry=self.registry).labels(**labels)
        self.store_up = Gauge("grayagent_store_up", "1 when the store answered the last read.",
                              list(labels), registry=self.registry).labels(**labels)
        self.healthy = Gauge("grayagent_healthy", "1 in the healthy state: the proxy serves the store's current "
                             "version.", list(labels), registry=self.registry).labels(**labels)
        states = Gauge("grayagent_health_state", "1 for the agent's health state (docs/operations.md), 0 for "
                       "the others.", ["target", "state"], registry=self.registry)
        self.states = {s.value: states.labels(target, s.value) for s in State}
        self.watch_lag = Gauge("grayagent_watch_lag_seconds",
                               "How long the proxy has been behind the store's current version (0: in step).",
                               list(labels), registry=self.registry).labels(**labels)
        self.last_apply = Gauge("grayagent_last_apply_timestamp_seconds", "Unix time of the last apply attempt.",
                                list(labels), registry=self.registry).labels(**labels)
        self.target = target
        self._behind_since: float | None = None

    def record_apply(self, result: str, steps_ms: dict[str, float], reloaded: bool) -> None:
        self._applies.labels(self.target, result).inc()
        for step, ms in steps_ms.items():
            self._steps.labels(self.target, step).observe(ms / 1000)
        if reloaded:
            self.reloads.inc()
        self.last_apply.set(time.time())

    def record_state(self, applied: int | None, desired: int | None, store_up: bool, state: str) -> None:
        self.applied_version.set(applied or 0)
        if desired is not None:
            self.desired_version.set(desired)
        self.store_up.set(1 if store_up else 0)
        self.healthy.set(1 if state == State.HEALTHY.value else 0)
        for name, gauge in self.states.items():
            gauge.set(1 if name == state else 0)
        behind = desired is not None and applied != desired
        now = time.monotonic()
        if behind and self._behind_since is None:
            self._behind_since = now
        elif not behind:
            self._behind_since = None
        self.watch_lag.set(now - self._behind_since if self._behind_since is not None else 0.0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]


class StatusServer:
    """A tiny HTTP server for /metrics and /healthz (and /status, the agent status as JSON)."""

    def __init__(self, listen: str, metrics: AgentMetrics, health: HealthCheck,
                 status: Callable[[], dict[str, Any]]) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        metrics_ref, health_ref, status_ref = metrics, health, status

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, metrics_ref.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok, detail = health_ref()
                    self._send(200 if ok else 503, json.dumps(detail).encode(), "application/json")
                elif path == "/status":
                    self._send(200, json.dumps(status_ref()).encode(), "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, int(port)), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="status-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> StatusServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
