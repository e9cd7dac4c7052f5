"""The Nacos store's watch: the listener long-poll on the pointer, with a full re-read after every error."""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import threading
import time
from urllib.parse import unquote_plus

from grayagent.errors import GrayagentError, StoreError
from grayagent.stores.base import WatchHandler
from grayagent.stores.nacos_client import NacosConnection, md5_hex, redact

LONG_POLL_MS = 30000           # the server holds a listener request this long when nothing changes (floor 10 s)
MIN_POLL_GAP = 0.25           # seconds between listener requests at the least


class NacosWatch:
    def __init__(self, conn: NacosConnection, pointer_id: str) -> None:
        self.conn = conn
        self.url = conn.url
        self.pointer_id = pointer_id
        self._poll_conn: http.client.HTTPConnection | None = None
        self._poll_lock = threading.Lock()

    def run(self, handler: WatchHandler, stop: threading.Event) -> None:
        """Long-poll the pointer; after every start, reconnect or listener error, re-read it (full resync)."""
        done = threading.Event()
        canceller = threading.Thread(target=self._cancel_on_stop, args=(stop, done), name="nacos-watch-cancel",
                                     daemon=True)
        canceller.start()
        md5: str | None = None  # None: resync first
        reachable: bool | None = None
        delay = 0.2
        last_poll = 0.0
        try:
            while not stop.is_set():
                try:
                    # A server that answers every poll at once (or an md5 we compute differently) must not
                    # become a hot loop: at most a few polls a second.
                    if time.monotonic() - last_poll < MIN_POLL_GAP and stop.wait(MIN_POLL_GAP):
                        break
                    last_poll = time.monotonic()
                    if md5 is None:
                        pointer = self.conn.read(self.pointer_id)
                        md5 = "" if pointer is None else md5_hex(pointer)
                        if reachable is not True:
                            reachable = True
                            handler.store_state(True)
                        handler.changed()
                        delay = 0.2
                    if self._long_poll(md5):
                        md5 = None  # changed: read it, wake the agent, poll with the new md5
                except GrayagentError as exc:
                    if stop.is_set():
                        break
                    md5 = None
                    if reachable is not False:
                        reachable = False
                        handler.store_state(False, redact(str(exc)))
                    stop.wait(delay * random.uniform(0.5, 1.5))
                    delay = min(delay * 2, 10.0)
        finally:
            done.set()

    def _long_poll(self, md5: str) -> bool:
        """True when the server reports the pointer changed; False when the poll timed out unchanged."""
        tenant = self.conn.config.namespace
        probe = "\x02".join([self.pointer_id, self.conn.group, md5, *([tenant] if tenant else [])]) + "\x01"
        status, body = self.conn.http.call(
            "POST", "/v1/cs/configs/listener", params={"tenant": tenant} if tenant else None,
            form={"Listening-Configs": probe}, headers={"Long-Pulling-Timeout": str(LONG_POLL_MS)},
            what="listen", resend=False, timeout=LONG_POLL_MS / 1000 + 10, register=self._set_poll_conn)
        if status != 200:
            raise StoreError(f"{self.url}: listen: HTTP {status}: "
                             f"{redact(body.decode('utf-8', 'replace'))[:200]}")
        changed = unquote_plus(body.decode("utf-8", "replace"))
        return any(line.split("\x02", 1)[0] == self.pointer_id for line in changed.split("\x01") if line)

    def _set_poll_conn(self, conn: http.client.HTTPConnection | None) -> None:
        with self._poll_lock:
            self._poll_conn = conn

    def _cancel_on_stop(self, stop: threading.Event, done: threading.Event) -> None:
        while not done.is_set():
            if stop.wait(0.2):
                with self._poll_lock:
                    conn = self._poll_conn
                if conn is not None and conn.sock is not None:
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_RDWR)  # ends a held long-poll at once
                return

