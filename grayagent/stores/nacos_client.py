"""Talking to Nacos for the Nacos store (grayagent/stores/nacos.py): URL and config, login, a thin HTTP
client for what the SDK cannot do (casMd5 writes, the listener long-poll), the SDK client itself, and
secrets kept out of every log line. Why not the SDK alone: see nacos.py's module comment.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.error import HTTPError
from urllib.parse import urlencode

import structlog
from nacos import NacosClient

from grayagent.errors import GrayagentError, StoreError, UsageError
from grayagent.rules.docload import loads_json
from grayagent.stores.urls import NACOS_DEFAULT_GROUP, parse_store_url

log = structlog.get_logger("grayagent.nacos")
T = TypeVar("T")

DEFAULT_GROUP = NACOS_DEFAULT_GROUP
PASSWORD_ENV = "GRAYAGENT_NACOS_PASSWORD"  # noqa: S105 - the variable's name
NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
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


def tame_sdk_logging() -> None:
    """WARNING and up only (the SDK logs the token at INFO and the password at DEBUG), through the bridge."""
    root = logging.getLogger("nacos")
    if not any(isinstance(h, _SdkLogBridge) for h in root.handlers):
        root.addHandler(_SdkLogBridge())
    root.propagate = False
    for name in ("nacos", "nacos.client"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------- thin HTTP

class AmbiguousWrite(StoreError):
    """A write reached a server but no answer came back: it may or may not have been applied."""


class NacosHttp:
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
            data = loads_json(body)
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
                        raise AmbiguousWrite(f"{self.url}: {what}: no answer from {last}") from None
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

class SdkClient(NacosClient):  # type: ignore[misc]
    """nacos-sdk-python's v1 client, fed our token and kept away from local snapshot and log files."""

    def __init__(self, config: NacosConfig, http_client: NacosHttp) -> None:
        self._grayagent_http = http_client
        super().__init__(server_addresses=",".join(config.endpoints), namespace=config.namespace or None)
        if config.user:
            # The SDK sends a token only when both are set. The real password stays in NacosHttp: the SDK's own
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


class NacosConnection:
    """One store's HTTP client and its SDK client (created on first use: no network I/O at start-up)."""

    def __init__(self, config: NacosConfig, url: str) -> None:
        self.config = config
        self.url = url
        self.group = config.group
        tame_sdk_logging()
        self.http = NacosHttp(config, url)
        self._client_lock = threading.Lock()
        self._client: SdkClient | None = None

    def sdk(self) -> SdkClient:
        with self._client_lock:
            if self._client is None:
                self._client = SdkClient(self.config, self.http)
            return self._client

    def existing_sdk(self) -> SdkClient | None:
        with self._client_lock:
            return self._client

    def call(self, what: str, fn: Callable[[SdkClient], T]) -> T:
        try:
            return fn(self.sdk())
        except GrayagentError as exc:
            if str(exc).startswith(self.url):
                raise
            raise StoreError(f"{self.url}: {what}: {exc}") from None
        except Exception as exc:  # the SDK raises bare Exceptions, HTTPError, NacosException...
            detail = str(exc) or type(exc).__name__
            if "All server are not available" in detail:
                detail = "unreachable"
            raise StoreError(f"{self.url}: {what}: {redact(detail)}") from None

    def read(self, data_id: str) -> str | None:
        """A config's content, or None when it does not exist."""
        content = self.call(f"read {data_id}", lambda c: c.get_config(data_id, self.group, no_snapshot=True))
        return None if content is None else str(content)

    def close(self) -> None:
        with self._client_lock:
            self._client = None


def list_page(client: SdkClient, group: str, page: int) -> Any:
    """One page of the v1 group listing; None when the server has that API off (Nacos 3 answers 410 Gone)."""
    try:
        return client.get_configs(no_snapshot=True, group=group, page_no=page, page_size=500)
    except HTTPError as exc:
        if exc.code == 410:
            return None
        raise


