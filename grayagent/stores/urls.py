"""What every networked store URL shares: endpoints, options, and secrets kept out of the URL.

    scheme://[user@]host:port[,host2:port]/path?option=value&user=NAME&password_file=PATH&timeout=S

A password written into the URL is refused: URLs end up in shell history, process lists, logs and audit
entries. It comes from password_file= or the store's environment variable instead.

Also `store_identity`: which store any URL names (directory stores too), for keying the agent's cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from grayagent.errors import UsageError
from grayagent.text import is_decimal

COMMON_OPTIONS = frozenset({"user", "password_file", "timeout"})


@dataclass(frozen=True)
class StoreURL:
    scheme: str
    where: str                 # the prefix of every error message: names the URL without its secrets
    endpoints: tuple[str, ...]
    path: str                  # unquoted, without surrounding slashes
    options: dict[str, str]    # the backend's own options (common ones removed)
    user: str | None
    password: str | None
    timeout: float


def parse_store_url(url: str, *, example: str, password_env: str, options: frozenset[str]) -> StoreURL:
    parts = urlsplit(url)
    where = f"--store: {parts.scheme}://{parts.hostname or ''}..."
    secret_hint = f"password_file= or ${password_env}"
    if parts.password is not None:
        raise UsageError(f"{where}: do not put the password in the URL; use {secret_hint}")
    netloc = parts.netloc.rsplit("@", 1)[-1]
    endpoints = tuple(e.strip() for e in netloc.split(",") if e.strip())
    if not endpoints:
        raise UsageError(f"{where}: no endpoints; use {example}")
    for ep in endpoints:
        host, _, port = ep.rpartition(":")
        if not host or not is_decimal(port) or not 0 < int(port) < 65536:
            raise UsageError(f"{where}: endpoint {ep!r} is not host:port")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    if "password" in query:
        raise UsageError(f"{where}: use {secret_hint}, not password=")
    known = options | COMMON_OPTIONS
    unknown = sorted(set(query) - known)
    if unknown:
        raise UsageError(f"{where}: unknown option {unknown[0]!r} (known: {', '.join(sorted(known))})")
    user = query.get("user") or (unquote(parts.username) if parts.username else None)
    password: str | None = None
    if "password_file" in query:
        if not user:
            raise UsageError(f"{where}: password_file= needs user=")
        try:
            password = Path(query["password_file"]).read_text().rstrip("\n")
        except OSError as exc:
            raise UsageError(f"{where}: password_file: {exc.strerror}") from None
    elif user:
        password = os.environ.get(password_env)
        if password is None:
            raise UsageError(f"{where}: user {user!r} needs {secret_hint}")
    try:
        timeout = float(query.get("timeout", "5"))
    except ValueError:
        raise UsageError(f"{where}: timeout: not a number") from None
    if not 0 < timeout <= 300:
        raise UsageError(f"{where}: timeout: between 0 and 300 seconds")
    own = {k: v for k, v in query.items() if k in options}
    return StoreURL(parts.scheme, where, endpoints, unquote(parts.path).strip("/"), own, user, password, timeout)


NACOS_DEFAULT_GROUP = "GRAYAGENT"


def store_identity(url: str) -> str:
    """Which store a URL names, whoever wrote it: no user, secrets, timeouts or TLS files, endpoints sorted,
    defaults filled in. Equal for a raw --store URL and the store's own `url`; needs no secret to compute,
    so break-glass tools can find a store's cache while the store (and its password) is unavailable."""
    from grayagent.stores.file import path_from_url  # a late import: file.py imports nothing of this module

    scheme = url.split("://", 1)[0] if "://" in url else "file"
    if scheme == "file":
        return f"file://{path_from_url(url).resolve()}"
    parts = urlsplit(url)
    endpoints = ",".join(sorted(e.strip() for e in parts.netloc.rsplit("@", 1)[-1].split(",") if e.strip()))
    path = unquote(parts.path).strip("/")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    if scheme == "nacos":
        namespace = "" if query.get("namespace") == "public" else query.get("namespace", "")
        return f"nacos://{endpoints}/{path}?namespace={namespace}&group={query.get('group') or NACOS_DEFAULT_GROUP}"
    return f"{'etcd' if scheme == 'etcds' else scheme}://{endpoints}/{path}"
