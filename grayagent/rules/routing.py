"""The one meaning of a route. `grayagent route` runs on this module; renderers take their arithmetic from it.

A request is reduced to field values (strings, "" when absent), then:
1. rules are tried in order; the first whose conditions all hold decides;
2. otherwise the split: bucket = ngx_murmur_hash2(salt + key), cut exactly as nginx's split_clients cuts;
3. otherwise (no split) the default upstream.
"""

from __future__ import annotations

import functools
import ipaddress
import random
import re
import secrets
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from grayagent.rules.model import CidrCondition, Field, Service, Split, StringMatch, ValueCondition
from grayagent.rules.modeldata import AnonymousCookie
from grayagent.rules.regexsubset import compile_portable

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
SPLIT_RANGE = 0xFFFFFFFF  # nginx: part->percent * (uint64_t) 0xffffffff / 10000

# The extraction patterns below are also rendered verbatim into nginx `map` regexes and the Envoy Lua filter.
# nginx 1.22 gives these repeated headers joined (its $http_cookie and $http_x_forwarded_for); others: the first.
_JOINED_HEADERS = {"cookie": "; ", "x-forwarded-for": ", "}
COOKIE_PATTERN = "(?:^|;)[ \\t]*{name}=([^;]*)"
QUERY_PATTERN = "(?:^|&){name}=([^&]*)"


def murmur2(data: bytes) -> int:
    """nginx's ngx_murmur_hash2: MurmurHash2, seed 0 ^ len, little-endian blocks, uint32 arithmetic."""
    length = len(data)
    h = length & _MASK
    blocks = length // 4
    for (k,) in struct.iter_unpack("<I", data[: blocks * 4]):
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = data[blocks * 4:]
    if len(tail) == 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h ^= tail[0]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


@dataclass(frozen=True, slots=True)
class SplitPart:
    """One part of a split. `boundary` is None for the last part, which takes the rest (nginx's `*`)."""

    upstream: str
    hundredths: int
    boundary: int | None


def split_parts(split: Split) -> tuple[SplitPart, ...]:
    """The parts nginx builds: zero weights left out, cumulative uint32 boundaries, the last one `*`."""
    nonzero = [(name, w) for name, w in split.weights if w > 0]
    parts: list[SplitPart] = []
    last = 0
    for i, (name, w) in enumerate(nonzero):
        if i == len(nonzero) - 1:
            parts.append(SplitPart(name, w, None))
        else:
            last += w * SPLIT_RANGE // 10000
            parts.append(SplitPart(name, w, last))
    return tuple(parts)


def pick_part(parts: tuple[SplitPart, ...], bucket: int) -> str:
    for part in parts:
        if part.boundary is None or bucket < part.boundary:
            return part.upstream
    raise AssertionError("the last split part always matches")  # pragma: no cover


@dataclass(frozen=True)
class Request:
    """A request as the proxies see it. Header names are lowercased; each header keeps its first value."""

    headers: Mapping[str, str] = field(default_factory=dict)
    path: str = "/"
    query_string: str = ""
    source_ip: str | None = None

    @classmethod
    def build(cls, headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
              cookies: Mapping[str, str] | None = None, query: Mapping[str, str] | str | None = None,
              path: str | None = None, source_ip: str | None = None) -> Request:
        """Assemble a request from parts, the way a client would send them.

        Headers may repeat when given as pairs: the first value counts, except that Cookie and
        X-Forwarded-For headers are joined ("; " and ", ") as nginx does. Values lose leading and trailing
        spaces and tabs, as in both proxies.
        """
        merged: dict[str, str] = {}
        pairs = headers.items() if isinstance(headers, Mapping) else (headers or ())
        for name, raw in pairs:
            key, value = name.lower(), raw.strip(" \t")
            if key in _JOINED_HEADERS and key in merged:
                merged[key] = f"{merged[key]}{_JOINED_HEADERS[key]}{value}"
            else:
                merged.setdefault(key, value)
        if cookies:
            joined = "; ".join(f"{k}={v}" for k, v in cookies.items())
            merged["cookie"] = f"{merged['cookie']}; {joined}" if merged.get("cookie") else joined
        raw_path = path or "/"
        query_string = ""
        if "?" in raw_path:
            raw_path, query_string = raw_path.split("?", 1)
        if isinstance(query, str):
            query_string = query
        elif query:
            extra = "&".join(f"{k}={v}" for k, v in query.items())
            query_string = f"{query_string}&{extra}" if query_string else extra
        return cls(merged, raw_path, query_string, source_ip)


@functools.lru_cache(maxsize=4096)
def _extractor(pattern: str, name: str) -> re.Pattern[bytes]:
    return re.compile(pattern.format(name=re.escape(name)).encode("ascii"))


def field_value(fld: Field, request: Request) -> str:
    """The value a field has in a request; "" when absent."""
    if fld.kind == "header":
        return request.headers.get(fld.name, "")
    if fld.kind == "path":
        return request.path
    source = request.headers.get("cookie", "") if fld.kind == "cookie" else request.query_string
    pattern = COOKIE_PATTERN if fld.kind == "cookie" else QUERY_PATTERN
    found = _extractor(pattern, fld.name).search(source.encode("utf-8", "surrogateescape"))
    return found.group(1).decode("utf-8", "surrogateescape") if found else ""


@functools.lru_cache(maxsize=4096)
def _regex(pattern: str) -> Any:
    return compile_portable(pattern)


def string_matches(match: StringMatch, value: str) -> bool:
    """An empty value counts as absent: only `present: false` holds for it."""
    if match.kind == "present":
        return bool(value) == match.present
    if not value:
        return False
    if match.kind == "exact":
        return value == match.values[0]
    if match.kind == "prefix":
        return value.startswith(match.values[0])
    if match.kind == "in":
        return value in match.values
    if match.kind == "list":
        return value in match.members
    return _regex(match.values[0]).search(value.encode("utf-8", "surrogateescape")) is not None


def _source_ip(request: Request) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not request.source_ip:
        return None
    try:
        ip = ipaddress.ip_address(request.source_ip)
    except ValueError:
        return None
    # nginx's geo and the Lua matcher treat an IPv4-mapped peer (::ffff:10.1.2.3) as the IPv4 address.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True, slots=True)
class Decision:
    upstream: str
    rule: str | None
    by: Literal["rule", "split", "random", "default"]
    bucket: int | None = None
    set_cookie: bool = False  # the gateway answers with a new anonymous-visitor cookie (whenKeyMissing: cookie)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"upstream": self.upstream, "rule": self.rule, "by": self.by}
        if self.bucket is not None:
            out["bucket"] = self.bucket
        if self.set_cookie:
            out["set_cookie"] = True
        return out


def route(service: Service, request: Request,
          random_bucket: Callable[[], int] = lambda: random.getrandbits(32),
          *,
          new_anonymous_id: Callable[[], str] = lambda: secrets.token_hex(16)) -> Decision:
    for rule in service.rules:
        holds = True
        for cond in rule.conditions:
            if isinstance(cond, ValueCondition):
                holds = string_matches(cond.match, field_value(cond.field, request))
            elif isinstance(cond, CidrCondition):
                ip = _source_ip(request)
                holds = ip is not None and any(ip in net for net in cond.networks)
            if not holds:
                break
        if holds:
            return Decision(rule.to, rule.name, "rule")
    split = service.split
    if split is None:
        return Decision(service.default, None, "default")
    parts = split_parts(split)
    key = field_value(split.key, request) if split.key is not None else ""
    if split.key is not None and key:
        bucket = murmur2((split.salt + key).encode("utf-8", "surrogateescape"))
        return Decision(pick_part(parts, bucket), None, "split", bucket)
    if split.anonymous_cookie is not None:
        return anonymous_split(split.salt, parts, split.anonymous_cookie, request, new_anonymous_id)
    if split.key is not None and split.when_key_missing == "default":
        return Decision(service.default, None, "default")
    return Decision(pick_part(parts, random_bucket()), None, "random")


# ---------------------------------------------------------------------------------------------- anonymous visitors
# whenKeyMissing: cookie. A request that no rule decides and that has no key is hashed on the visitor's ID
# from the anonymous cookie, exactly like a key; without a well-formed ID it gets a fresh one, is hashed on it,
# and the answer sets the cookie. The renderers take the ID form and the Set-Cookie attributes from here.

ANONYMOUS_ID = re.compile(r"[0-9a-f]{32}")  # 128 random bits as lowercase hex: nginx's $request_id


def anonymous_id(value: str) -> str | None:
    """The visitor ID a cookie value holds, or None when it is not one (absent, foreign or malformed).
    Spaces and tabs around it do not count: nginx keeps a tab that ends the Cookie header, the others drop it."""
    value = value.strip(" \t")
    return value if ANONYMOUS_ID.fullmatch(value) else None


def cookie_attributes(cookie: AnonymousCookie) -> str:
    """Everything after NAME=ID in the Set-Cookie header; no Secure, since listeners may be plain HTTP."""
    return f"; Path=/; Max-Age={cookie.max_age}; HttpOnly; SameSite=Lax"


def set_cookie_header(cookie: AnonymousCookie, visitor: str) -> str:
    return f"{cookie.name}={visitor}{cookie_attributes(cookie)}"


def anonymous_split(salt: str, parts: tuple[SplitPart, ...], cookie: AnonymousCookie, request: Request,
                    new_id: Callable[[], str]) -> Decision:
    """The split for a keyless request: `split` on the visitor's ID, or `random` on a fresh one (set_cookie)."""
    visitor = anonymous_id(field_value(Field("cookie", cookie.name), request))
    fresh = visitor is None
    if visitor is None:
        visitor = new_id()
    bucket = murmur2((salt + visitor).encode("ascii"))
    return Decision(pick_part(parts, bucket), None, "random" if fresh else "split", bucket, set_cookie=fresh)
