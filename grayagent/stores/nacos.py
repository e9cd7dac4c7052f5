"""The Nacos store: versions and the current pointer as config dataIds, fleet status as naming instances.

URL:  nacos://[user@]host:8848[,host2:8848...]/<release>[?options]
  namespace=ID          Nacos namespace id (default: the public namespace)
  group=NAME            config group that holds the release's dataIds (default GRAYAGENT)
  user=NAME             Nacos user; the password comes from password_file=PATH or $GRAYAGENT_NACOS_PASSWORD
  timeout=SECONDS       per-request timeout (default 5)
Passwords in the URL itself are refused: URLs end up in shell history, logs and audit entries. `url` is the
redacted form (no password_file, no timeout). Release, group and namespace use Nacos's dataId characters
(letters, digits, `_ - . :`). The server must speak the v1 client OpenAPI, as nacos-sdk-python 2.0.x
needs: Nacos 2.x, or 3.x with `nacos.core.api.compatibility.client.enabled=true`. `history` uses the v1
admin listing where it is on, else Nacos 3's /v3/admin/cs/config/list.

Layout in <group> of <namespace> (stable; other tools may read and write it):
  <release>.v<N>      immutable, written once: the version envelope (stores/envelope.py) with "publish_id", or
                      a bare rule document written by another tool (metadata derived; it starts a chain)
  <release>.current   the current version number as decimal text; "0" or missing means nothing published
  naming service <release>.agents, same group: one ephemeral instance per agent (ip = host name, port 1),
                      its status JSON in metadata["grayagent.status"]; heartbeats every 5 s, so it
                      turns unhealthy (and leaves `fleet()`) 15 s after the agent dies
Nacos's own config history is not used: it keeps 30 days and offers no rollback. Every version is its own
dataId, kept until someone deletes it, and a revert publishes an old version's content as a new version.

Publishing, with compare-and-set on the pointer (casMd5, which must travel as an HTTP header):
  1. read the pointer; if it does not say `expected`, Conflict at once (no entry is written);
  2. create <release>.v<N>, N = expected+1 with a create-only write (below). Entries are never overwritten:
     if N is taken by a racer on the same parent, wait for it to move the pointer and lose (Conflict) without
     writing an entry; if by an abandoned attempt (older, or the pointer never moved), try N+1;
  3. wait until the entry reads back: reads come from a cache that trails writes by ~90 ms (up to ~1 s), and
     an agent that sees the pointer move must find the version it names (without this wait, 6 of 200
     entries were still unreadable when the pointer that named them already read back);
  4. CAS the pointer from the exact text read in step 1 to "N": of concurrent publishers on one parent,
     exactly one wins; the others get Conflict (CLI exit 3);
  5. wait until the pointer reads back N, so the next command sees this publish (read-your-write).
An entry whose publisher lost anyway (it crashed, or timed out) stays as the record of an attempt that never
became current; `history` leaves such entries out: an entry whose parent's successor in the current lineage
is another entry.

Create-only write: a CAS whose casMd5 is the md5 of a random nonce, which no stored content has. On an existing
dataId it fails. On a missing one Nacos inserts instead of comparing, and its unique key (data_id, group_id,
tenant_id) lets exactly one of concurrent inserts succeed (measured: 8 racers, one winner, in every trial).

Client: nacos-sdk-python's v1 NacosClient reads configs (get_config, get_configs, with no_snapshot and no
failover directory, so a stale local copy is never served) and registers and beats naming instances.
It cannot send casMd5, logs in with the password in the URL query, treats a lost CAS (HTTP 500 "false")
as "all servers down", and its config watcher sleeps 1 s between polls, swallows errors (so no reconnect is
ever visible) and forks a multiprocessing manager. So this module logs in itself (password in the POST body),
hands the token to the SDK, and does CAS writes and the listener long-poll over a thin HTTP client.
The SDK's loggers are kept at WARNING, bridged into structlog with tokens and passwords redacted.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import json
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.error import HTTPError
from urllib.parse import unquote_plus, urlencode

import structlog
from nacos import NacosClient

from grayagent.errors import Conflict, GrayagentError, StoreError, UsageError, VersionNotFound
from grayagent.stores import envelope
from grayagent.stores.base import VersionMeta, VersionRecord, WatchHandler, digest_of, utc_now
from grayagent.stores.urls import NACOS_DEFAULT_GROUP, parse_store_url

log = structlog.get_logger("grayagent.nacos")
T = TypeVar("T")

DEFAULT_GROUP = NACOS_DEFAULT_GROUP
PASSWORD_ENV = "GRAYAGENT_NACOS_PASSWORD"  # noqa: S105 - the variable's name
NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
LONG_POLL_MS = 30000           # the server holds a listener request this long when nothing changes (floor 10 s)
MIN_POLL_GAP = 0.25           # seconds between listener requests at the least
RACER_WAIT = 5.0              # how long a publisher waits for a racer's pointer move (its read-back takes <= 3 s)
READ_LAG_DEADLINE = 3.0        # reads trail writes by ~90 ms, measured up to 1.1 s
AGENT_PORT = 1                 # naming instances need a port; ours are status records, not endpoints
HEARTBEAT_SECONDS = 5.0        # Nacos marks an instance unhealthy after 15 s without beats, drops it at 30 s
STATUS_KEY = "grayagent.status"
NOWHERE = os.path.join(os.devnull, "grayagent")  # the SDK's failover/snapshot dirs: a path that cannot exist


@dataclass(frozen=True)
class NacosConfig:
    endpoints: tuple[str, ...]
    release: str
    namespace: str
    group: str
    user: str | None
    password: str | None
    timeout: float

    @property
    def redacted_url(self) -> str:
        user = f"{self.user}@" if self.user else ""
        query = urlencode({k: v for k, v in (("namespace", self.namespace), ("group", self.group)) if v})
        return f"nacos://{user}{','.join(self.endpoints)}/{self.release}?{query}"


def parse_url(url: str) -> NacosConfig:
    parsed = parse_store_url(url, example="nacos://host:8848[,host2:8848]/<release>", password_env=PASSWORD_ENV,
                             options=frozenset({"namespace", "group"}))
    where = parsed.where
    release = parsed.path
    if not release:
        raise UsageError(f"{where}: name the release, e.g. nacos://host:8848/shop")
    namespace = parsed.options.get("namespace", "")
    namespace = "" if namespace == "public" else namespace  # Nacos's name for the default namespace
    group = parsed.options.get("group") or DEFAULT_GROUP
    for label, value in (("release", release), ("group", group), ("namespace", namespace)):
        if value and not NAME_RE.fullmatch(value):
            raise UsageError(f"{where}: {label} {value[:40]!r}: use letters, digits and _ - . : (at most 128)")
    return NacosConfig(parsed.endpoints, release, namespace, group, parsed.user, parsed.password, parsed.timeout)


def md5_hex(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()  # noqa: S324 - Nacos's content fingerprint, not security


# ---------------------------------------------------------------------------------------------- secrets in logs

_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()
_SECRET_PARAM = re.compile(r"(?i)(access_?token|password|token)([\"']?\s*[=:]\s*[\"']?)[^&\s\"',}]+")
_JWT = re.compile(r"eyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]{4,}")
# The SDK logs each failure of the calls we make and then raises it to us, where it becomes one StoreError line.
_SDK_HANDLED = re.compile(r"\[(do-sync-req|get-config|get-configs|delete-file|add-naming-instance|send-heartbeat|"
                          r"remove-naming-instance|list-naming-instance)\]")


def _remember_secret(secret: str | None) -> None:
    if secret and len(secret) >= 4:  # replacing a 1-3 character password everywhere would garble every line
        with _SECRETS_LOCK:
            _SECRETS.add(secret)


def redact(text: str) -> str:
    with _SECRETS_LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, "***")
    return _JWT.sub("***", _SECRET_PARAM.sub(r"\1\2***", text))


class _SdkLogBridge(logging.Handler):
    """The SDK's log records, one redacted line each through structlog; tracebacks dropped."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a malformed SDK format string must not break the caller
            message = str(record.msg)
        if _SDK_HANDLED.match(message):
            return
        log.warning("nacos client", sdk_level=record.levelname.lower(), message=redact(message)[:500])


def _tame_sdk_logging() -> None:
    """WARNING and up only (the SDK logs the token at INFO and the password at DEBUG), through the bridge."""
    root = logging.getLogger("nacos")
    if not any(isinstance(h, _SdkLogBridge) for h in root.handlers):
        root.addHandler(_SdkLogBridge())
    root.propagate = False
    for name in ("nacos", "nacos.client"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------- thin HTTP

class _Ambiguous(StoreError):
    """A write reached a server but no answer came back: it may or may not have been applied."""


class _Http:
    """Login, casMd5 writes and the listener long-poll, which the SDK cannot do. Thread-safe.

    Fails over between endpoints on connection errors. A request that may have been applied is never
    re-sent to another endpoint when `resend` is False: the caller checks what happened instead.
    """

    def __init__(self, config: NacosConfig, url: str) -> None:
        self.config = config
        self.url = url
        self._lock = threading.Lock()
        self._login_lock = threading.Lock()
        self._index = random.randrange(len(config.endpoints))  # spread a fleet's agents over the members
        self._token: str | None = None
        self._token_expires = 0.0
        _remember_secret(config.password)

    def _endpoint(self) -> str:
        with self._lock:
            return self.config.endpoints[self._index]

    def _fail_over(self, endpoint: str) -> None:
        with self._lock:
            if self.config.endpoints[self._index] == endpoint:
                self._index = (self._index + 1) % len(self.config.endpoints)

    # -------------------------------------------------------------- auth

    def token(self, refresh: bool = False) -> str | None:
        if not self.config.user:
            return None
        with self._login_lock:  # one login at a time; the others reuse its token
            if not refresh and self._token and time.monotonic() < self._token_expires:
                return self._token
            self._login()
            return self._token

    def _login(self) -> None:
        form = {"username": self.config.user or "", "password": self.config.password or ""}
        status, body = self._request("POST", "/v1/auth/login", form=form, what="login", resend=True, auth=False)
        if status in (401, 403, 500) and not body.lstrip().startswith(b'{"accessToken'):
            # Nacos answers a wrong password with 500 and an unknown user with 403 (v3) or 500 (v1).
            raise StoreError(f"{self.url}: login as {self.config.user!r} refused (HTTP {status}): "
                             "wrong user or password")
        try:
            data = json.loads(body)
            token = str(data["accessToken"])
            ttl = float(data.get("tokenTtl", 18000))
        except (ValueError, KeyError, TypeError):
            raise StoreError(f"{self.url}: login: HTTP {status}, no token in the answer") from None
        _remember_secret(token)
        self._token = token
        self._token_expires = time.monotonic() + max(ttl * 0.8, 1.0)  # renew well before it expires

    # -------------------------------------------------------------- requests

    def call(self, method: str, path: str, *, params: dict[str, str] | None = None,
             form: dict[str, str] | None = None, headers: dict[str, str] | None = None, what: str,
             resend: bool = True, timeout: float | None = None,
             register: Callable[[http.client.HTTPConnection | None], None] | None = None) -> tuple[int, bytes]:
        """One request with the auth token; on 403 a fresh token and one more try (nothing was applied)."""
        status, body = self._request(method, path, params=params, form=form, headers=headers, what=what,
                                     resend=resend, timeout=timeout, register=register)
        if status == 403 and self.config.user:
            self.token(refresh=True)  # tokens expire, and a restored server may have another secret
            status, body = self._request(method, path, params=params, form=form, headers=headers, what=what,
                                         resend=resend, timeout=timeout, register=register)
        return status, body

    def _request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                 form: dict[str, str] | None = None, headers: dict[str, str] | None = None, what: str,
                 resend: bool, auth: bool = True, timeout: float | None = None,
                 register: Callable[[http.client.HTTPConnection | None], None] | None = None) -> tuple[int, bytes]:
        all_headers = {"User-Agent": "grayagent", **(headers or {})}
        if auth:
            token = self.token()
            if token:
                all_headers["accessToken"] = token  # a header, so the token stays out of URLs
        body = urlencode(form).encode() if form is not None else None
        if body is not None:
            all_headers["Content-Type"] = "application/x-www-form-urlencoded;charset=utf-8"
        target = "/nacos" + path + ("?" + urlencode(params) if params else "")
        last = ""
        for _ in range(len(self.config.endpoints)):
            endpoint = self._endpoint()
            host, _, port = endpoint.rpartition(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=self.config.timeout)
            if register is not None:
                register(conn)
            try:
                try:
                    conn.connect()
                except OSError as exc:  # nothing was sent: any endpoint may take it
                    last = f"{endpoint}: {_oserror(exc)}"
                    self._fail_over(endpoint)
                    continue
                if timeout is not None and conn.sock is not None:
                    conn.sock.settimeout(timeout)  # a long-poll waits longer than a connect may
                try:
                    conn.request(method, target, body=body, headers=all_headers)
                    response = conn.getresponse()
                    return response.status, response.read()
                except (OSError, http.client.HTTPException) as exc:
                    last = f"{endpoint}: {_oserror(exc)}"
                    self._fail_over(endpoint)
                    if not resend:
                        raise _Ambiguous(f"{self.url}: {what}: no answer from {last}") from None
            finally:
                if register is not None:
                    register(None)
                conn.close()
        raise StoreError(f"{self.url}: {what}: unreachable ({last})")


def _oserror(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------------------------- the SDK

class _SdkClient(NacosClient):  # type: ignore[misc]
    """nacos-sdk-python's v1 client, fed our token and kept away from local snapshot and log files."""

    def __init__(self, config: NacosConfig, http_client: _Http) -> None:
        self._grayagent_http = http_client
        super().__init__(server_addresses=",".join(config.endpoints), namespace=config.namespace or None)
        if config.user:
            # The SDK sends a token only when both are set. The real password stays in _Http: the SDK's own
            # login would put it in the URL query, and it logs the token (see get_access_token).
            self.username = config.user
            self.password = "(held by grayagent)"  # noqa: S105 - a placeholder
        self.set_options(default_timeout=config.timeout, no_snapshot=True, failover_base=NOWHERE,
                         snapshot_base=NOWHERE)

    def initLog(self, *args: Any) -> None:
        """The SDK would add a file handler under ~/logs/nacos; its records go through _SdkLogBridge."""

    def get_access_token(self, force_refresh: bool = False) -> str | None:
        self.token = self._grayagent_http.token(refresh=force_refresh)
        return self.token

    def _do_sync_req(self, url: str, headers: Any = None, params: Any = None, data: Any = None,
                     timeout: Any = None, method: str = "GET", module: str = "config") -> Any:
        refreshed = False
        for attempt in range(6):
            try:
                return super()._do_sync_req(url, headers, params, data, timeout, method, module)
            except HTTPError as exc:
                if exc.code == 403 and self.username and not refreshed:
                    refreshed = True
                    self.get_access_token(force_refresh=True)
                    continue
                if exc.code == 409 and attempt < 5:
                    # "being modified": the SDK would report the config as missing; it clears in milliseconds.
                    time.sleep(0.02 * (attempt + 1))
                    continue
                if exc.code == 409:
                    raise StoreError("the config is being modified; try again") from None
                raise
        raise StoreError("unreachable")  # the loop always returns or raises; this satisfies type checkers


# ---------------------------------------------------------------------------------------------- the store

class NacosStore:
    def __init__(self, url: str) -> None:
        self.config = parse_url(url)
        self.url = self.config.redacted_url
        self.release = self.config.release
        self.group = self.config.group
        self.pointer_id = f"{self.release}.current"
        self.agents_service = f"{self.release}.agents"
        self._version_re = re.compile(re.escape(self.release) + r"\.v([1-9][0-9]{0,17})")
        _tame_sdk_logging()
        self._http = _Http(self.config, self.url)
        self._client_lock = threading.Lock()
        self._client: _SdkClient | None = None  # created on first use: no network I/O while the agent starts
        self._reported: tuple[str, dict[str, str]] | None = None  # (host, metadata) of the last report
        self._beat_lock = threading.Lock()
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self._poll_conn: http.client.HTTPConnection | None = None
        self._poll_lock = threading.Lock()

    # ------------------------------------------------------------------ SDK calls

    def _sdk(self) -> _SdkClient:
        with self._client_lock:
            if self._client is None:
                self._client = _SdkClient(self.config, self._http)
            return self._client

    def _call(self, what: str, fn: Callable[[_SdkClient], T]) -> T:
        try:
            return fn(self._sdk())
        except GrayagentError as exc:
            if str(exc).startswith(self.url):
                raise
            raise StoreError(f"{self.url}: {what}: {exc}") from None
        except Exception as exc:  # the SDK raises bare Exceptions, HTTPError, NacosException...
            detail = str(exc) or type(exc).__name__
            if "All server are not available" in detail:
                detail = "unreachable"
            raise StoreError(f"{self.url}: {what}: {redact(detail)}") from None

    def _read(self, data_id: str) -> str | None:
        """A config's content, or None when it does not exist."""
        content = self._call(f"read {data_id}", lambda c: c.get_config(data_id, self.group, no_snapshot=True))
        return None if content is None else str(content)

    def _version_id(self, version: int) -> str:
        return f"{self.release}.v{version}"

    # ------------------------------------------------------------------ reading

    def _parse_pointer(self, text: str | None) -> int:
        if text is None:
            return 0
        value = text.strip()
        if not value.isdigit():
            raise StoreError(f"{self.url}: {self.pointer_id} holds {value[:20]!r}, not a version number")
        return int(value)

    def _current_number(self) -> int:
        return self._parse_pointer(self._read(self.pointer_id))

    def _decode(self, version: int, raw: str) -> VersionRecord:
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if envelope.is_envelope(data):
            return envelope.decode(data, f"{self.url}: {self._version_id(version)}", version)
        # A bare document written by another tool (console, OpenAPI): derive what the envelope would have said.
        content = raw.encode("utf-8")
        return VersionRecord(VersionMeta(version, 0, "", "written directly to Nacos", "", digest_of(content)),
                             content)

    def current(self) -> VersionRecord | None:
        number = self._current_number()
        if not number:
            return None
        deadline = time.monotonic() + READ_LAG_DEADLINE
        while True:
            try:
                return self.get(number)
            except VersionNotFound:
                # Publishers make the entry readable before the pointer names it; only another tool (or a
                # lagging cluster member) shows a pointer ahead of its entry, and then only briefly.
                if time.monotonic() > deadline:
                    raise StoreError(f"{self.url}: {self.pointer_id} names version {number}, which does not "
                                     "exist") from None
                time.sleep(0.05)

    def get(self, version: int) -> VersionRecord:
        raw = self._read(self._version_id(version)) if version > 0 else None
        if raw is None:
            raise VersionNotFound(f"version {version} does not exist in {self.url}")
        return self._decode(version, raw)

    def _entries(self) -> dict[int, str]:
        """Every version entry's raw content, from the group listing (read from the database, no lag)."""
        found: dict[int, str] = {}
        page = 1
        while True:
            listing: Any = self._call("list versions", functools.partial(
                _list_page, group=self.group, page=page))
            if listing is None:
                return self._entries_v3()
            if not isinstance(listing, dict):
                raise StoreError(f"{self.url}: list versions: unexpected answer")
            for item in listing.get("pageItems") or []:
                match = self._version_re.fullmatch(str(item.get("dataId", "")))
                if match and item.get("content") is not None:
                    found[int(match.group(1))] = str(item["content"])
            if page >= int(listing.get("pagesAvailable") or 1):
                return found
            page += 1

    def _entries_v3(self) -> dict[int, str]:
        """The same from Nacos 3's admin API, for servers that keep the v1 admin API off (its default).

        That listing has no content, so each entry is read on its own (from the cache: an entry written in
        the last moments may be missing, as with any read).
        """
        found: dict[int, str] = {}
        page = 1
        while True:
            params = {"search": "blur", "dataId": f"{self.release}.v*", "groupName": self.group,
                      "pageNo": str(page), "pageSize": "500"}
            if self.config.namespace:
                params["namespaceId"] = self.config.namespace
            status, body = self._http.call("GET", "/v3/admin/cs/config/list", params=params, what="list versions")
            try:
                data: Any = json.loads(body)["data"] if status == 200 else None
                items = list(data["pageItems"] or [])
                pages = int(data.get("pagesAvailable") or 1)
            except (ValueError, KeyError, TypeError):
                raise StoreError(f"{self.url}: list versions: HTTP {status} from the v1 and v3 list APIs") from None
            for item in items:
                match = self._version_re.fullmatch(str(item.get("dataId", "")))
                if match and (raw := self._read(match.group(0))) is not None:
                    found[int(match.group(1))] = raw
            if page >= pages:
                return found
            page += 1

    def history(self) -> list[VersionMeta]:
        """Every version, except entries of publishers that lost the compare-and-set (see the module doc)."""
        raws = self._entries()
        metas = {n: self._decode(n, raw).meta for n, raw in raws.items()}
        numbers = sorted(metas)

        def parent(n: int) -> int:
            if _publish_id(raws[n]) is not None:  # our envelope names its parent
                return metas[n].parent
            below = [m for m in numbers if m < n]  # a bare entry, or an envelope from another tool
            return below[-1] if below else 0

        current = self._current_number()
        lineage: dict[int, int] = {}  # parent -> its successor in the current lineage
        node = current if current in metas else 0
        while node:
            up = parent(node)
            if up >= node or up in lineage:
                break
            lineage[up] = node
            node = up if up in metas else 0
        in_lineage = set(lineage.values())
        kept = [n for n in numbers if n in in_lineage or parent(n) not in lineage]
        return [metas[n] for n in kept]

    # ------------------------------------------------------------------ writing

    def _write(self, data_id: str, content: str, cas_md5: str, kind: str, what: str) -> bool | None:
        """Publish with casMd5: True applied, False refused (md5 mismatch), None unknown (no answer)."""
        form = {"dataId": data_id, "group": self.group, "content": content, "type": kind}
        if self.config.namespace:
            form["tenant"] = self.config.namespace
        try:
            status, body = self._http.call("POST", "/v1/cs/configs", form=form, headers={"casMd5": cas_md5},
                                           what=what, resend=False)
        except _Ambiguous:
            return None
        answer = body.strip()
        if status == 200 and answer == b"true":
            return True
        if status == 500 and answer == b"false":
            return False
        if 400 <= status < 500:
            raise StoreError(f"{self.url}: {what}: HTTP {status}: {redact(body.decode('utf-8', 'replace'))[:200]}")
        return None  # a server error: the write may have happened before it

    def _create_only(self, data_id: str, content: str, kind: str, what: str) -> bool | None:
        # No stored content has the md5 of a fresh random nonce, so this CAS cannot overwrite; on a missing
        # dataId Nacos inserts, and the unique key lets one of several concurrent inserts through.
        return self._write(data_id, content, md5_hex(uuid.uuid4().hex), kind, what)

    def _wait_read(self, data_id: str, done: Callable[[str | None], bool], deadline: float) -> str | None:
        """Re-read until `done(content)` or the deadline (read-your-write across the cache lag)."""
        end = time.monotonic() + deadline
        delay = 0.01
        while True:
            content = self._read(data_id)
            if done(content) or time.monotonic() >= end:
                return content
            time.sleep(delay)
            delay = min(delay * 1.5, 0.1)

    def _settled_number(self, expected: int) -> int:
        """The pointer after a lost CAS, for the Conflict message: a lagging read may still show `expected`."""
        text = self._wait_read(self.pointer_id, lambda t: self._parse_pointer(t) != expected, 1.0)
        return self._parse_pointer(text)

    def publish(self, content: bytes, expected: int, author: str, message: str) -> VersionMeta:
        envelope.require_utf8(content)
        pointer_text = self._read(self.pointer_id)
        actual = self._parse_pointer(pointer_text)
        if actual < expected:
            # A lagging read (the server's cache, or another cluster member) can trail a publish we know of.
            pointer_text = self._wait_read(self.pointer_id, lambda t: self._parse_pointer(t) >= expected, 1.0)
            actual = self._parse_pointer(pointer_text)
        if actual != expected:
            raise Conflict(expected, actual)  # checked first so that a stale publisher writes no entry
        nonce = uuid.uuid4().hex  # tells our entry from a racer's, when an answer was lost
        parent_digest = envelope.parent_link(self.get, expected)
        number = expected + 1
        for _ in range(64):
            meta = VersionMeta(number, expected, utc_now(), author, message, digest_of(content), parent_digest)
            entry = envelope.encode(meta, content, publish_id=nonce).decode("utf-8")
            version_id = self._version_id(number)
            created = self._create_only(version_id, entry, "json", f"publish {version_id}")
            seen = self._wait_read(version_id, lambda t: t is not None, READ_LAG_DEADLINE)
            if created or (created is None and seen is not None and _publish_id(seen) == nonce):
                break
            # Taken, and entries are never overwritten. A racer on the same parent is about to move the
            # pointer: wait for it and lose without leaving an entry behind. An abandoned attempt: skip it.
            if seen is not None and _racing(seen, expected):
                now = self._parse_pointer(self._wait_read(self.pointer_id, lambda t: self._parse_pointer(t) != expected,
                                                          RACER_WAIT))
            else:
                now = self._current_number()
            if now != expected:
                raise Conflict(expected, now)
            number += 1
        else:
            raise StoreError(f"{self.url}: publish: no free version number after {number - expected - 1} tries")
        if pointer_text is None:
            # A CAS on a missing dataId creates it whatever casMd5 says, so it cannot tell "still nothing" from
            # "a racer just created it". Create the pointer as "0" first, create-only: that changes nothing a
            # reader sees (missing and "0" both mean no version), never overwrites a racer's pointer, and
            # makes the CAS below a real comparison against "0".
            self._create_only(self.pointer_id, "0", "text", "publish: create the pointer")
            pointer_text = "0"
        won = self._write(self.pointer_id, str(number), md5_hex(pointer_text), "text", "publish: move the pointer")
        if won is None:
            # No answer: only this publisher moves the pointer to `number` (it created that entry), so the
            # pointer showing `number` means it landed.
            seen_text = self._wait_read(self.pointer_id, lambda t: self._parse_pointer(t) == number,
                                        READ_LAG_DEADLINE)
            seen_number = self._parse_pointer(seen_text)
            if seen_number == number:
                won = True
            elif seen_number != expected:
                raise Conflict(expected, seen_number)
            else:
                raise StoreError(f"{self.url}: publish: the server did not confirm version {number}; "
                                 "check `grayagent history` before publishing again")
        if not won:
            raise Conflict(expected, self._settled_number(expected))
        seen_text = self._wait_read(self.pointer_id, lambda t: self._parse_pointer(t) == number, READ_LAG_DEADLINE)
        if self._parse_pointer(seen_text) != number:
            log.warning("published, but reads do not show it yet", store=self.url, version=number)
        return meta

    # ------------------------------------------------------------------ watching

    def watch(self, handler: WatchHandler, stop: threading.Event) -> None:
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
                        pointer = self._read(self.pointer_id)
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
        tenant = self.config.namespace
        probe = "\x02".join([self.pointer_id, self.group, md5, *([tenant] if tenant else [])]) + "\x01"
        status, body = self._http.call(
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

    # ------------------------------------------------------------------ fleet status

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
        ok = self._call("report status", lambda c: c.add_naming_instance(
            self.agents_service, host, AGENT_PORT, cluster_name="DEFAULT", metadata=metadata, ephemeral=True,
            group_name=self.group))
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

            def beat(client: _SdkClient, host: str = host, metadata: dict[str, str] = metadata) -> Any:
                return client.send_heartbeat(self.agents_service, host, AGENT_PORT, cluster_name="DEFAULT",
                                             metadata=metadata, group_name=self.group)
            try:
                answer = self._call("heartbeat", beat)
                if isinstance(answer, dict) and answer.get("code") == 20404:  # the server lost it (restart)
                    self._register(host, metadata)
                failing = False
            except GrayagentError as exc:
                if not failing:  # once per outage; the status reporter logs its own failures
                    log.warning("heartbeat failed", store=self.url, error=str(exc))
                failing = True

    def fleet(self) -> list[dict[str, Any]]:
        answer = self._call("read fleet status", lambda c: c.list_naming_instance(
            self.agents_service, group_name=self.group, healthy_only=False))
        out = []
        for instance in (answer.get("hosts") or []) if isinstance(answer, dict) else []:
            if not instance.get("healthy", False):
                continue  # no heartbeat for 15 s: the agent is gone (Nacos drops it at 30 s)
            try:
                entry = json.loads((instance.get("metadata") or {}).get(STATUS_KEY, ""))
            except ValueError:
                continue
            if isinstance(entry, dict):
                entry.setdefault("host", instance.get("ip"))
                out.append(entry)
        return sorted(out, key=lambda e: str(e.get("host")))

    def close(self) -> None:
        self._beat_stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(self.config.timeout + 1)  # a heartbeat in flight lands before the removal
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None and self._reported is not None:
            with contextlib.suppress(Exception):  # the instance expires by itself anyway
                client.remove_naming_instance(self.agents_service, self._reported[0], AGENT_PORT,
                                              cluster_name="DEFAULT", ephemeral=True, group_name=self.group)


def _list_page(client: _SdkClient, group: str, page: int) -> Any:
    """One page of the v1 group listing; None when the server has that API off (Nacos 3 answers 410 Gone)."""
    try:
        return client.get_configs(no_snapshot=True, group=group, page_no=page, page_size=500)
    except HTTPError as exc:
        if exc.code == 410:
            return None
        raise


def _racing(raw: str, parent: int) -> bool:
    """Whether an entry looks like a live publisher's on `parent`: ours, that parent, written moments ago."""
    try:
        data = json.loads(raw)
        created = datetime.strptime(str(data["created"]), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        return bool(int(data["parent"]) == parent and "publish_id" in data
                    and abs((datetime.now(UTC) - created).total_seconds()) < RACER_WAIT * 4)
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def _publish_id(raw: str) -> str | None:
    with contextlib.suppress(ValueError, AttributeError):
        value = json.loads(raw).get("publish_id")
        return str(value) if value is not None else None
    return None


__all__ = ["NacosConfig", "NacosStore", "parse_url", "redact"]
