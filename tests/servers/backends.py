"""Tiny threaded HTTP backends for proxy tests.

Every backend answers every request (any method, any path) with status 200, its own name as the
body and an `X-Backend: <name>` header. HTTP/1.1 keep-alive, Nagle off and one write per response,
so a proxy in front of it can push a few thousand requests a second through one backend.

    with Backend("stable") as b:      # or b = Backend("stable").start(); ...; b.stop()
        b.port, b.url, b.requests      # `requests`: the last few (method, target, headers) seen
        b.fail(0.1, status=503)        # from now on about 10 % of answers are 503 (deterministic spread)
        b.slow(0.2)                    # and every answer takes 200 ms more; b.fail(0), b.slow(0) undo
"""

from __future__ import annotations

import collections
import contextlib
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256
    backend: Backend

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()

    def process_request(self, request, client_address):  # type: ignore[no-untyped-def]
        with self.conn_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):  # type: ignore[no-untyped-def]
        with self.conn_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):  # type: ignore[no-untyped-def]
        # Peers (proxies under test) reset keep-alive connections all the time; that is not news.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Cut open keep-alive connections too, so a stopped backend really stops answering."""
        with self.conn_lock:
            conns, self.connections = list(self.connections), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def _answer(self) -> None:
        backend = self.server.backend
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        failing = backend._record(self.command, self.path, list(self.headers.items()))
        if backend.delay:
            time.sleep(backend.delay)
        body = backend.name.encode()
        code = f"{backend.fail_status} Failing" if failing else "200 OK"
        extra = "".join(f"{k}: {v}\r\n" for k, v in backend.extra_headers)
        head = (f"HTTP/1.1 {code}\r\nX-Backend: {backend.name}\r\nContent-Type: text/plain\r\n{extra}"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        self.wfile.write(head + (b"" if self.command == "HEAD" else body))

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


class Backend:
    """An HTTP server on 127.0.0.1 (free port unless given) that answers with its own name."""

    def __init__(self, name: str, port: int = 0, keep_requests: int = 100) -> None:
        self.name = name
        self._port = port
        self.requests: collections.deque[tuple[str, str, list[tuple[str, str]]]] = \
            collections.deque(maxlen=keep_requests)
        self.count = 0
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.fail_ratio = 0.0
        self.fail_status = 503
        self.delay = 0.0
        self._fail_debt = 0.0
        self.extra_headers: list[tuple[str, str]] = []  # sent with every answer (e.g. the app's own Set-Cookie)

    def fail(self, ratio: float, status: int = 503) -> Backend:
        """Answer `ratio` of the requests with `status`, spread evenly (every 10th at 0.1), not at random."""
        with self._lock:
            self.fail_ratio, self.fail_status, self._fail_debt = ratio, status, 0.0
        return self

    def slow(self, seconds: float) -> Backend:
        self.delay = seconds
        return self

    def _record(self, method: str, target: str, headers: list[tuple[str, str]]) -> bool:
        """Count the request; True when this one should fail."""
        with self._lock:
            self.count += 1
            self.requests.append((method, target, headers))
            self._fail_debt += self.fail_ratio
            if self._fail_debt >= 1.0:
                self._fail_debt -= 1.0
                return True
            return False

    @property
    def port(self) -> int:
        assert self._server is not None, "backend not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Backend:
        self._server = _Server(("127.0.0.1", self._port))
        self._server.backend = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"backend-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        if self._thread is not None:
            self._thread.join(5)
        self._server = None
        self._thread = None

    def __enter__(self) -> Backend:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
