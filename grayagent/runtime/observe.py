"""The agent's /metrics (Prometheus text format, prometheus-client), /healthz and /status, on loopback by default.

Health is defined once, in grayagent/runtime/health.py. /healthz answers 200 only in the `healthy` state, otherwise
503; its body, /status and the `grayagent_healthy` / `grayagent_health_state` gauges show the same state
and reason. The bodies carry no secrets (store URLs are already redacted).
Off loopback, /status and /metrics can require a bearer token (status_token_file); /healthz stays open.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import select
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from grayagent.runtime.health import State

log = structlog.get_logger("grayagent.runtime.observe")
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
PROTECTED = ("/status", "/metrics")  # /healthz stays open: load balancers and systemd probes carry no token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _BoundedHTTPServer(HTTPServer):
    """An HTTP server that handles connections on a fixed pool of threads, and drops new ones while
    `max_pending` are already waiting or being served: a flood of idle connections costs sockets, not threads."""

    request_queue_size = 128  # listen backlog: socketserver's 5 makes a burst of clients wait on SYN retries

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], workers: int,
                 max_pending: int, read_timeout: float) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="status-http")  # before: a failed bind closes it
        self.slots = threading.BoundedSemaphore(max_pending)
        self.read_timeout = read_timeout
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # over capacity: refuse rather than queue without bound
            return
        self.pool.submit(self._handle, request, client_address, time.monotonic())

    def _handle(self, request: Any, client_address: Any, accepted: float) -> None:
        try:
            # The first bytes must come within read_timeout of the accept, however long the connection
            # waited for a thread: a queue of silent connections drains at once, not one timeout each.
            remaining = max(0.0, accepted + self.read_timeout - time.monotonic())
            if select.select([request], [], [], remaining)[0]:
                self.finish_request(request, client_address)
        except Exception:  # noqa: S110 - a client that resets or times out is its own problem
            pass
        finally:
            self.shutdown_request(request)
            self.slots.release()

    def server_close(self) -> None:
        super().server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)


class StatusServer:
    """A tiny HTTP server for /metrics and /healthz (and /status, the agent status as JSON).

    Each connection gets `read_timeout` seconds per read, on one of `workers` threads; `token`, when set,
    must come as `Authorization: Bearer <token>` for /status and /metrics."""

    def __init__(self, listen: str, metrics: AgentMetrics, health: HealthCheck,
                 status: Callable[[], dict[str, Any]], token: str | None = None, workers: int = 4,
                 read_timeout: float = 5.0, max_pending: int = 64) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        metrics_ref, health_ref, status_ref = metrics, health, status
        expected = f"Bearer {token}".encode() if token else None

        class Handler(BaseHTTPRequestHandler):
            timeout = read_timeout  # socketserver sets it on the socket: a silent client is dropped

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if expected is not None and path in PROTECTED and not hmac.compare_digest(
                        self.headers.get("Authorization", "").encode(), expected):
                    self._send(401, b"bearer token required\n", "text/plain", {"WWW-Authenticate": "Bearer"})
                elif path == "/metrics":
                    self._send(200, metrics_ref.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok, detail = health_ref()
                    self._send(200 if ok else 503, json.dumps(detail).encode(), "application/json")
                elif path == "/status":
                    self._send(200, json.dumps(status_ref()).encode(), "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        if not is_loopback(host):
            log.warning("status server listens beyond loopback", listen=listen,
                        protected=("/status and /metrics need the bearer token" if token else
                                   "none: anyone who reaches it reads /status and /metrics; set status_token_file"))
        self.server = _BoundedHTTPServer((host, int(port)), Handler, workers, max_pending, read_timeout)
        self.thread = threading.Thread(target=self.server.serve_forever, name="status-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> StatusServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.thread.is_alive():  # shutdown() waits for serve_forever, which never ran otherwise
            self.server.shutdown()
        self.server.server_close()
