"""The agent's status server under hostile clients: idle connections cost no threads and are dropped, and a
configured bearer token guards /status and /metrics (never /healthz)."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from grayagent.runtime.observe import AgentMetrics, StatusServer
from tests.servers.proc import wait_until

WORKERS = 4


def _server(listen: str = "127.0.0.1:0", **settings: Any) -> StatusServer:
    return StatusServer(listen, AgentMetrics("nginx"), lambda: (True, {"healthy": True}), lambda: {"version": 3},
                        **settings)


@pytest.fixture
def server() -> Iterator[StatusServer]:
    running = _server(workers=WORKERS, read_timeout=0.5).start()
    yield running
    running.stop()


def _get(port: int, path: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.01)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_half_open_connections_stay_within_the_pool_and_are_dropped(server: StatusServer) -> None:
    threads_before = threading.active_count()
    clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(60)]
    try:
        peak = threads_before
        open_clients = list(clients)

        def all_dropped() -> bool:
            nonlocal peak, open_clients
            peak = max(peak, threading.active_count())
            open_clients = [c for c in open_clients if not _closed_by_server(c)]
            return not open_clients

        wait_until(all_dropped, 15, "the server to drop 60 silent connections")
        assert peak <= threads_before + WORKERS, f"{peak - threads_before} threads for 60 idle connections"
        assert _get(server.port, "/healthz") == 200, "still serving after the flood"
    finally:
        for c in clients:
            c.close()


def test_bearer_token_guards_status_and_metrics_but_not_healthz() -> None:
    token = "s3cret-" + "x" * 20
    with structlog.testing.capture_logs() as logs:
        server = _server(token=token).start()
    try:
        for path in ("/status", "/metrics"):
            assert _get(server.port, path) == 401, path
            assert _get(server.port, path, "wrong") == 401, path
            assert _get(server.port, path, token) == 200, path
        assert _get(server.port, "/healthz") == 200
    finally:
        server.stop()
    assert token not in repr(logs)


def test_listening_beyond_loopback_warns() -> None:
    with structlog.testing.capture_logs() as logs:
        server = _server("0.0.0.0:0")  # the case under test; closed at once
    server.stop()
    warned = [e for e in logs if e["log_level"] == "warning"]
    assert warned and "status_token_file" in warned[0]["protected"]
    with structlog.testing.capture_logs() as logs:
        _server().stop()
    assert not [e for e in logs if e["log_level"] == "warning"]
