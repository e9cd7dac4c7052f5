"""nginx dynamic mode, pure half: a static skeleton that nginx loads, and routing data pushed into it live.

The skeleton holds only what nginx cannot change without a reload: upstream blocks, one server per service
(the same listen / server_name / default-server / 404 layout as reload mode), the Lua package path and shared
dict, and a loopback control server (version + push). Each service's `location /` sets `$ga_upstream` to its
default upstream and lets `access_by_lua` (grayagent/lua/grayroute_nginx.lua over grayroute_core.lua, the
same core the Envoy filter runs) replace it from the pushed data. With no data (after an nginx restart the
shared dict is empty) every request goes to the default upstream: never an error.

The routing data (rules, matchers, weights, salts, split boundaries from routing.split_parts) is one Lua
chunk of table constructors, serialised by envoy_render.lua_literal (every byte outside [A-Za-z0-9 _./:@-]
becomes a `\\ddd` escape), which nginx runs in an empty environment.

The skeleton's fingerprint covers the topology (services in order, listen addresses, hosts, upstream names
and servers), the host options and the Lua sources: the target reloads only when it changes. Each service's
default upstream is baked into the skeleton but not into the fingerprint: a new default rewrites the file
(so a restart starts from it) and reaches running workers through the data, without a reload.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from grayagent.rules.model import CidrCondition, Field, Release, Service, ValueCondition
from grayagent.targets.layout import upstream_id
from grayagent.targets.lua_data import RuleInputs, list_strings, lua_literal, lua_source, lua_string, service_table
from grayagent.targets.nginx_render import ACCESS_LOG_FORMAT, quote, upstream_blocks
from grayagent.targets.nginx_server import catch_all_servers, loopback_server, server_names_hash, service_server

VERSION_PATH = "/grayagent/version"
PUSH_PATH = "/grayagent/data"
DICT_NAME = "grayagent_routes"   # grayroute_nginx.lua reads ngx.shared.grayagent_routes
LUA_DIR = "grayagent-lua"        # next to the skeleton file
LUA_FILES = ("grayroute_core.lua", "grayroute_nginx.lua")
DATA_FILE = "grayagent-routes.lua"  # the last data pushed successfully (the agent's last-good)
MODULE = "grayroute_nginx"
DEFAULT_DICT_SIZE = "128m"


@dataclass(frozen=True, slots=True)
class DynamicOptions:
    """Inputs that are not in the document: they belong to the host, not the release."""

    lua_dir: str                          # absolute: where the Lua modules live (lua_package_path)
    control_listen: str = "127.0.0.1:18089"  # version + push endpoints; loopback only
    conf_name: str = "grayagent.conf"
    keepalive: int = 32
    reuseport: bool = False
    # The dict holds the pushed data's current and previous generation, and during a topology change a
    # third (the next skeleton's): 128m keeps 1,000,000 short IDs (about 12 MB of data each) three times.
    dict_size: str = DEFAULT_DICT_SIZE
    max_push_size: str = "64m"
    access_log: str = ""  # per-request JSON lines for rollout figures, as in reload mode; "" = off
    # The file (0600, root's) holding the secret that signs every push: loopback alone would let any local
    # process, or an SSRF in an upstream app on this host, reroute traffic and fake the version the agent
    # verifies. nginx's master reads it at init (init_by_lua), so no rendered file holds the secret itself.
    # "" = pushes are not signed (only for tests of the rendering).
    token_file: str = ""


def topology(release: Release, options: DynamicOptions) -> dict[str, Any]:
    """What only a reload can change in nginx; the fingerprint is its hash."""
    return {
        "services": [[svc.name, str(svc.listen), list(svc.hosts),
                      [[up.name, list(up.servers)] for up in svc.upstreams]] for svc in release.services],
        "options": [options.lua_dir, options.control_listen, options.keepalive, options.reuseport,
                    options.dict_size, options.max_push_size, options.access_log,
                    options.token_file],
        # New Lua code must reach every worker at once: a worker loads a module on its first request.
        "lua": [hashlib.sha256(lua_source(name)).hexdigest() for name in LUA_FILES],
    }


def fingerprint(release: Release, options: DynamicOptions) -> str:
    canonical = json.dumps(topology(release, options), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


_FP_LINE = re.compile(rb"^# skeleton ([0-9a-f]{32}):", re.MULTILINE)


def skeleton_fingerprint(skeleton: bytes) -> str | None:
    """The fingerprint a rendered skeleton carries (its second line); None for anything else."""
    found = _FP_LINE.search(skeleton[:400])
    return found.group(1).decode("ascii") if found else None


# ---------------------------------------------------------------------------------------------- data


def _inputs(svc: Service) -> RuleInputs:
    """The fields the service reads (rules first, then the split key), and its CIDR lists."""
    base = RuleInputs.of(svc)
    fields: dict[Field, None] = dict.fromkeys(base.fields)
    if svc.split is not None and svc.split.key is not None:
        fields.setdefault(svc.split.key)
    if svc.split is not None and svc.split.anonymous_cookie is not None:
        fields.setdefault(Field("cookie", svc.split.anonymous_cookie.name))
    return RuleInputs(tuple(fields), base.cidrs)


def service_data(svc: Service) -> dict[str, Any]:
    """One service's routing data, in the shape grayroute_core.decide reads (indexes are 1-based)."""
    inputs = _inputs(svc)
    config = service_table(svc, inputs)  # default, inputs, cidrs, split: exactly what the Envoy filter gets
    if svc.split is not None and svc.split.key is not None:
        config["split"]["key_input"] = inputs.fields.index(svc.split.key) + 1
    if svc.split is not None and svc.split.anonymous_cookie is not None:
        config["split"]["anon"]["input"] = inputs.fields.index(Field("cookie", svc.split.anonymous_cookie.name)) + 1
    rules = []
    for rule in svc.rules:
        conds: list[dict[str, Any]] = []
        for cond in rule.conditions:
            if isinstance(cond, ValueCondition):
                conds.append({"input": inputs.fields.index(cond.field) + 1,
                              "match": {"kind": cond.match.kind, "values": list(cond.match.values),
                                        "present": cond.match.present}})
            elif isinstance(cond, CidrCondition):
                conds.append({"cidr": inputs.cidrs.index(cond) + 1})
        rules.append({"name": rule.name, "to": rule.to, "conds": conds})
    config["rules"] = rules
    config["upstreams"] = {up.name: upstream_id(svc, up.name) for up in svc.upstreams}
    return config


def render_data(release: Release, version: int, digest: str, fp: str) -> str:
    """The pushed Lua chunk. One function per service keeps each under LuaJIT's 65,536 constants."""
    lines = ["-- Generated by grayagent: routing data for nginx dynamic mode. Data only: nginx runs it in an\n"
             "-- empty environment.\n",
             "local S = {}\n"]
    lists = list_strings(release.services, release.lists)
    if lists:
        lines.append("local L = {}\n")
    for svc in release.services:
        lines.append(f"S[{lua_string(svc.name)}] = (function() return {lua_literal(service_data(svc))} end)()\n")
    for name, joined in lists.items():
        lines.append(f"L[{lua_string(name)}] = {lua_string(joined)}\n")
    lines.append(f"return {{version = {version}, digest = {lua_string(digest)}, fingerprint = {lua_string(fp)}, "
                 f"release = {lua_string(release.name)}, services = S{', lists = L' if lists else ''}}}\n")
    return "".join(lines)


# ---------------------------------------------------------------------------------------------- skeleton


def _call(function: str, *args: str) -> str:
    return f"require({lua_string(MODULE)}).{function}({', '.join(lua_string(a) for a in args)})"


def _server(svc: Service, fp: str, options: DynamicOptions, first_on_listen: bool) -> str:
    return service_server(svc, options.reuseport and first_on_listen, options.access_log,
                          f"        set $ga_upstream {upstream_id(svc, svc.default)};\n"
                          f"        access_by_lua_block {{ {_call('access', svc.name, fp)} }}\n"
                          "        proxy_pass http://$ga_upstream;\n")


def render_skeleton(release: Release, options: DynamicOptions) -> str:
    fp = fingerprint(release, options)
    head = ("# Generated by grayagent (nginx dynamic mode). Do not edit: the agent replaces this file.\n"
            f"# skeleton {fp}: topology only; rules, weights and switches are pushed into the shared dict.\n\n"
            f"lua_package_path {quote(options.lua_dir + '/?.lua;;')};\n"
            f"lua_shared_dict {DICT_NAME} {options.dict_size};\n"
            + (f"init_by_lua_block {{ {_call('init', options.token_file)} }}\n" if options.token_file else ""))
    body: list[str] = [ACCESS_LOG_FORMAT] if options.access_log else []
    if hash_sizes := server_names_hash(release):  # the same server-name hash sizing as reload mode
        body.insert(0, hash_sizes)
    seen: set[str] = set()
    for svc in release.services:
        body.append(f"# ---- service {svc.name}\n")
        body.extend(upstream_blocks(svc, options.keepalive))
        body.append(_server(svc, fp, options, str(svc.listen) not in seen))
        seen.add(str(svc.listen))
    body.extend(catch_all_servers(release))
    body.append(loopback_server(
        "The agent's control server: loopback only. GET version; POST routing data.", options.control_listen,
        f"    location = {VERSION_PATH} {{\n"
        f"        content_by_lua_block {{ {_call('version', fp)} }}\n"
        "    }\n"
        f"    location = {PUSH_PATH} {{\n"
        f"        client_max_body_size {options.max_push_size};\n"
        f"        client_body_buffer_size {options.max_push_size};\n"
        f"        content_by_lua_block {{ {_call('push', fp)} }}\n"
        "    }\n"))
    return head + "\n" + "\n".join(body)


def render(release: Release, version: int, digest: str, options: DynamicOptions) -> dict[str, bytes]:
    """{path relative to the skeleton's directory: content}: skeleton, data, and the Lua modules."""
    fp = fingerprint(release, options)
    files = {options.conf_name: render_skeleton(release, options).encode("ascii"),
             DATA_FILE: render_data(release, version, digest, fp).encode("ascii")}
    for name in LUA_FILES:
        files[f"{LUA_DIR}/{name}"] = lua_source(name)
    return files


def _size_bytes(text: str) -> int:
    """An nginx size ("64k", "128m", "1g", "4096") in bytes."""
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:].lower(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def data_too_large(size: int, options: DynamicOptions) -> str | None:
    """Why nginx would refuse routing data of `size` bytes (the push body limit, or a shared dict that must
    hold three generations of it); None when it fits. Checked before anything changes, so a document with
    a huge ID list is one clear error instead of a refused push."""
    if size > _size_bytes(options.max_push_size):
        return (f"the routing data is {size} bytes, over the control server's push limit "
                f"({options.max_push_size}); make the ID lists smaller")
    if 3 * size > _size_bytes(options.dict_size):
        return (f"the routing data is {size} bytes; the shared dict {DICT_NAME} ({options.dict_size}) must hold "
                "three generations of it: make the ID lists smaller or the dict larger")
    return None
