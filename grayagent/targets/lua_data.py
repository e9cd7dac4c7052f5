"""The routing data that grayagent's Lua core (grayagent/lua/grayroute_core.lua) reads, and its sources.

Pure and shared: Envoy's Lua filter gets these tables embedded in its RDS file (envoy_render), nginx dynamic
mode gets them pushed as a chunk of table constructors (nginx_dynamic_render). One serialisation for both:
every byte of a document value outside [A-Za-z0-9 _./:@-] becomes a `\\ddd` decimal escape, so no quote,
bracket, newline or backslash from a document ever appears raw in Lua source.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from grayagent.rules.model import CidrCondition, Field, IdList, Service, ValueCondition
from grayagent.rules.modeldata import AnonymousCookie
from grayagent.rules.routing import cookie_attributes, split_parts

LUA_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _./:@-")
_LUA_BYTE = [chr(b) if b in LUA_SAFE else f"\\{b:03d}" for b in range(256)]  # one lookup per byte: fast for lists


def lua_string(value: str) -> str:
    """A double-quoted Lua string of the UTF-8 bytes of `value`: no quote, bracket, newline or backslash
    from the document ever appears raw. Always three digits, so a following digit cannot extend an escape."""
    return '"' + "".join(map(_LUA_BYTE.__getitem__, value.encode("utf-8", "surrogateescape"))) + '"'


def lua_literal(value: Any) -> str:
    """A Lua expression for plain data: str, int, bool, None, lists (arrays) and str-keyed dicts."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return lua_string(value)
    if value is None:
        return "nil"
    if isinstance(value, (list, tuple)):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{lua_string(k)}] = {lua_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no Lua literal for {type(value).__name__}")


@cache
def lua_source(name: str) -> bytes:
    """One of grayagent's own Lua modules (package data under grayagent/lua)."""
    return resources.files("grayagent").joinpath(f"lua/{name}").read_bytes()


def lua_field(fld: Field) -> list[str]:
    return [fld.kind] if fld.kind == "path" else [fld.kind, fld.name]


def lua_network(net: Any) -> list[Any]:
    if net.version == 4:
        return [4, int(net.network_address), net.prefixlen]
    packed = int(net.network_address)
    groups = [(packed >> (16 * (7 - i))) & 0xFFFF for i in range(8)]
    return [6, groups, net.prefixlen]


@dataclass(frozen=True, slots=True)
class RuleInputs:
    """The request values one service's rules read (numbered from 1 in the Lua tables), and its CIDR lists."""

    fields: tuple[Field, ...]
    cidrs: tuple[CidrCondition, ...]
    lists: tuple[tuple[Field, str], ...] = ()  # (field, list name) pairs of `list` conditions (list_inputs)

    @classmethod
    def of(cls, svc: Service) -> RuleInputs:
        fields: dict[Field, None] = {}
        cidrs: list[CidrCondition] = []
        for rule in svc.rules:
            for cond in rule.conditions:
                if isinstance(cond, ValueCondition):
                    fields.setdefault(cond.field)
                else:
                    cidrs.append(cond)
        return cls(tuple(fields), tuple(cidrs), tuple(list_inputs(svc)))


def service_table(svc: Service, inputs: RuleInputs) -> dict[str, Any]:
    """What grayroute_core reads for one service: default, inputs, CIDR lists and split."""
    config: dict[str, Any] = {
        "default": svc.default,
        "inputs": [lua_field(f) for f in inputs.fields],
        "cidrs": [[lua_network(n) for n in c.networks] for c in inputs.cidrs],
    }
    if pairs := list_inputs(svc):  # only with list conditions, so other documents render as before
        config["lists"] = [[inputs.fields.index(fld) + 1, name] for fld, name in pairs]
    if svc.split is not None:
        parts = split_parts(svc.split)
        config["split"] = {
            "salt": svc.split.salt,
            "key": lua_field(svc.split.key) if svc.split.key is not None else None,
            "when_key_missing": svc.split.when_key_missing,
            # The last part takes the rest; 2^32 is above every bucket.
            "parts": [[p.boundary if p.boundary is not None else 1 << 32, p.upstream] for p in parts],
        }
        if svc.split.anonymous_cookie is not None:
            config["split"]["anon"] = anonymous_table(svc.split.anonymous_cookie)
    return config


def anonymous_table(cookie: AnonymousCookie) -> dict[str, Any]:
    """split.anon for the Lua core (whenKeyMissing: cookie): the cookie's name and its Set-Cookie attributes."""
    return {"name": cookie.name, "attributes": cookie_attributes(cookie)}


def list_strings(services: Iterable[Service], lists: Iterable[IdList]) -> dict[str, str]:
    """The ID lists these services' rules use, each as one string of its IDs joined by "\\n" (IDs hold no
    control characters): grayroute_core.id_set builds the set at load time. One string constant per list,
    never a table constructor: LuaJIT allows 65,536 constants per function."""
    used = {c.match.values[0] for svc in services for r in svc.rules for c in r.conditions
            if isinstance(c, ValueCondition) and c.match.kind == "list"}
    return {lst.name: "\n".join(lst.values) for lst in lists if lst.name in used}


def list_inputs(svc: Service) -> list[tuple[Field, str]]:
    """The (field, list name) pairs a service's `list` conditions test, each once, in order; the Envoy
    filter publishes pair j's hit as x-grayagent-list-<j>."""
    pairs = {(c.field, c.match.values[0]): None for r in svc.rules for c in r.conditions
             if isinstance(c, ValueCondition) and c.match.kind == "list"}
    return list(pairs)
