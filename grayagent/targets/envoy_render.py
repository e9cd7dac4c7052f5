"""Render a Release into Envoy dynamic resources (LDS, CDS, RDS files) and the bootstraps that read them.

Pure and deterministic: the same release, version, digest and options give byte-identical files (JSON
with sorted keys). `render` returns {path relative to the Envoy dir: bytes}:

    lds/lds.json           one Listener per listen address (HCM with RDS from a file; a Lua filter with no code)
    cds/cds.json           one Cluster per (service, upstream), named like nginx's upstream blocks
    rds/<listener>.json    one RouteConfiguration per listener

Each kind lives in its own watched directory, so that a rename in rds/ makes Envoy re-read routes only:
a rule change never touches a listener.

How the one meaning of a route (grayagent.rules.routing) becomes Envoy:
- the listener's early header mutation removes every client-sent `x-grayagent-*` (and `x-envoy-*`) header
  before anything reads or routes on them;
- each virtual host's routes start with the catch-all to the default upstream, whose metadata names the
  service; the Lua script (grayagent/lua, embedded in RDS at the route-configuration level, so one Lua
  state per listener and worker) publishes each condition input as `x-grayagent-in-<i>`, each CIDR-list
  hit as `x-grayagent-cidr-<i>`, the split's upstream (murmur2 over salt + key, cut at boundaries computed
  here by routing.split_parts) as `x-grayagent-split`, and clears the route cache;
- ordered route entries then do the matching with Envoy's own header matchers: one entry per rule (all
  its conditions, plus `x-grayagent-split` present, which the script sets last), one per split upstream,
  and the catch-all to the default upstream, which is also where a request lands if the script fails.

Injection safety: document values reach the files only as JSON strings (json.dumps), as Envoy regexes
built from `regex_literal` (`\\xHH` escapes) or a checked portable regex, and inside the Lua source only as
Lua strings in which every byte outside [A-Za-z0-9 _./:@-] is a `\\ddd` decimal escape.
"""

from __future__ import annotations

import ipaddress
import json
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from grayagent.rules.model import Field, IdList, Listen, Release, Service, StringMatch, ValueCondition
from grayagent.rules.regexsubset import regex_literal
from grayagent.rules.routing import split_parts
from grayagent.targets.layout import default_service, services_by_listen, upstream_id
from grayagent.targets.lua_data import RuleInputs, list_strings, lua_literal, lua_source, lua_string, service_table
from grayagent.text import is_decimal

PREFIX = "x-grayagent-"
SPLIT_HEADER = PREFIX + "split"
LUA_FILTER = "envoy.filters.http.lua"
LDS_FILE = "lds/lds.json"
CDS_FILE = "cds/cds.json"
RDS_DIR = "rds"
DEFAULT_ENVOY_DIR = "/var/lib/grayagent/envoy"
ALL_IPV4 = "0.0.0.0"  # noqa: S104 - nginx's `listen PORT` binds every IPv4 address, and so does this

# RE2's default program-size limit (100) rejects a 30-value `in` list; raise it (docs/notes/envoy-probe.md).
RUNTIME = {"re2.max_program_size.error_level": 100000, "re2.max_program_size.warn_level": 100000}

_T = "type.googleapis.com/envoy."
T_LISTENER = _T + "config.listener.v3.Listener"
T_CLUSTER = _T + "config.cluster.v3.Cluster"
T_ROUTES = _T + "config.route.v3.RouteConfiguration"
T_HCM = _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
T_LUA = _T + "extensions.filters.http.lua.v3.Lua"
T_LUA_ROUTE = _T + "extensions.filters.http.lua.v3.LuaPerRoute"
T_ROUTER = _T + "extensions.filters.http.router.v3.Router"
T_EARLY = _T + "extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation"

@dataclass(frozen=True, slots=True)
class EnvoyOptions:
    """Inputs that are not in the document: they belong to the host, not the release."""

    envoy_dir: str = DEFAULT_ENVOY_DIR   # absolute; lds/, cds/ and rds/ live under it
    connect_timeout: str = "5s"
    route_timeout: str = "60s"           # nginx's proxy_read_timeout default


# ---------------------------------------------------------------------------------------------- names


def version_label(version: int, digest: str) -> str:
    """The version_info of every file of one apply; Envoy reports it back as version_text."""
    return f"{version}-{digest}"


def parse_label(label: str) -> tuple[int, str] | None:
    number, _, digest = label.partition("-")
    if not is_decimal(number) or not digest.startswith("sha256:"):
        return None
    return int(number), digest


def listener_name(listen: Listen) -> str:
    """Stable per listen address (a rename would replace the listener); [a-z0-9_] so stats stay readable."""
    if not listen.host:
        host = "any"
    else:
        host = ("ip6_" if ":" in listen.host else "ip4_") + listen.host.replace(".", "_").replace(":", "_")
    return f"grayagent_{host}_{listen.port}"


def rds_file(name: str) -> str:
    return f"{RDS_DIR}/{name}.json"


def rds_stat(name: str) -> str:
    """The admin stat holding the accepted version of a listener's routes (stat_prefix = route name)."""
    return f"http.{name}.rds.{name}.version_text"


# ---------------------------------------------------------------------------------------------- Lua


LUA_CHUNK = 100  # services per Lua function: LuaJIT allows 65,536 constants per function


def lua_script(services: Mapping[str, Mapping[str, Any]], lists: Mapping[str, str] | None = None) -> str:
    """The Envoy Lua filter code: the shared core, the per-service tables, the ID sets, then the adapter."""
    items = list(services.items())
    tables = "".join(f"for k, v in pairs((function() return {lua_literal(dict(items[i:i + LUA_CHUNK]))} end)()) "
                     "do SERVICES[k] = v end\n" for i in range(0, len(items), LUA_CHUNK))
    # Each list is one string constant, made a set once per Lua state (grayroute_core.id_set).
    tables += "".join(f"LISTS[{lua_string(name)}] = grayroute.id_set({lua_string(joined)})\n"
                      for name, joined in (lists or {}).items())
    return ("-- Generated by grayagent. Do not edit: the agent replaces this file.\n"
            "local grayroute = (function()\n" + lua_source("grayroute_core.lua").decode("utf-8") + "end)()\n"
            f"local PREFIX = {lua_string(PREFIX)}\n"
            "local SERVICES = {}\n" + ("local LISTS = {}\n" if lists else "") + tables
            + lua_source("grayroute_envoy.lua").decode("utf-8"))


# ---------------------------------------------------------------------------------------------- routes


def _input_header(inputs: RuleInputs, fld: Field) -> str:
    """The header the script sets to the value of one input."""
    return f"{PREFIX}in-{inputs.fields.index(fld) + 1}"


def _input_names(inputs: RuleInputs) -> list[str]:
    return ([f"{PREFIX}in-{i + 1}" for i in range(len(inputs.fields))]
            + [f"{PREFIX}cidr-{i + 1}" for i in range(len(inputs.cidrs))] + [SPLIT_HEADER]
            + [f"{PREFIX}list-{j + 1}" for j in range(len(inputs.lists))])


def _matcher(name: str, match: StringMatch) -> dict[str, Any]:
    """An Envoy header matcher meaning routing.string_matches; the script never sets an empty value."""
    if match.kind == "present":
        return {"name": name, "present_match": match.present}
    if match.kind == "exact" or (match.kind == "in" and len(match.values) == 1):
        string_match: dict[str, Any] = {"exact": match.values[0]}
    elif match.kind == "prefix":
        string_match = {"prefix": match.values[0]}
    elif match.kind == "in":
        # safe_regex is a full match, so the alternation needs no anchors.
        string_match = {"safe_regex": {"regex": "(?:" + "|".join(regex_literal(v) for v in match.values) + ")"}}
    else:
        # An unanchored search, as nginx's ~ and Python's re.search; (?s:...) keeps R's own flags untouched.
        string_match = {"safe_regex": {"regex": f"(?s:.*)(?:{match.values[0]})(?s:.*)"}}
    return {"name": name, "string_match": string_match}


def _needs_lua(svc: Service) -> bool:
    return bool(svc.rules) or svc.split is not None


class _Renderer:
    def __init__(self, options: EnvoyOptions, lists: tuple[IdList, ...] = ()) -> None:
        self.options = options
        self.lists = lists

    def _action(self, svc: Service, upstream: str) -> dict[str, Any]:
        return {"cluster": upstream_id(svc, upstream), "timeout": self.options.route_timeout}

    def routes(self, svc: Service, inputs: RuleInputs) -> list[dict[str, Any]]:
        metadata = {"filter_metadata": {LUA_FILTER: {"service": svc.name}}}
        out: list[dict[str, Any]] = []
        for rule in svc.rules:
            headers: list[dict[str, Any]] = []
            for cond in rule.conditions:
                if isinstance(cond, ValueCondition) and cond.match.kind == "list":
                    # The script tests the set; the route only asks whether it said "in the list".
                    pair = inputs.lists.index((cond.field, cond.match.values[0])) + 1
                    headers.append({"name": f"{PREFIX}list-{pair}", "present_match": True})
                elif isinstance(cond, ValueCondition):
                    headers.append(_matcher(_input_header(inputs, cond.field), cond.match))
                else:
                    headers.append({"name": f"{PREFIX}cidr-{inputs.cidrs.index(cond) + 1}", "present_match": True})
            headers.append({"name": SPLIT_HEADER, "present_match": True})
            out.append({"name": f"{svc.name}/rule/{rule.name}", "match": {"prefix": "/", "headers": headers},
                        "route": self._action(svc, rule.to), "metadata": metadata})
        if svc.split is not None:
            for upstream in dict.fromkeys(p.upstream for p in split_parts(svc.split)):
                if upstream != svc.default:
                    out.append({"name": f"{svc.name}/split/{upstream}",
                                "match": {"prefix": "/", "headers": [
                                    {"name": SPLIT_HEADER, "string_match": {"exact": upstream}}]},
                                "route": self._action(svc, upstream), "metadata": metadata})
        out.append({"name": f"{svc.name}/default", "match": {"prefix": "/"},
                    "route": self._action(svc, svc.default), "metadata": metadata})
        return out

    def virtual_host(self, name: str, svc: Service, domains: list[str], inputs: RuleInputs) -> dict[str, Any]:
        vhost: dict[str, Any] = {"name": name, "domains": domains, "routes": self.routes(svc, inputs)}
        if _needs_lua(svc):
            vhost["request_headers_to_remove"] = _input_names(inputs)
        else:
            vhost["typed_per_filter_config"] = {LUA_FILTER: {"@type": T_LUA_ROUTE, "disabled": True}}
        return vhost

    def route_config(self, name: str, services: list[Service]) -> dict[str, Any]:
        vhosts: list[dict[str, Any]] = []
        lua: dict[str, dict[str, Any]] = {}
        default = default_service(services)
        for svc in services:
            inputs = RuleInputs.of(svc)
            if _needs_lua(svc):
                lua[svc.name] = service_table(svc, inputs)
            if svc.hosts:
                # nginx ignores a trailing dot in Host; Envoy compares domains literally.
                domains = [d for h in svc.hosts for d in (h, h + ".")]
                vhosts.append(self.virtual_host(svc.name, svc, domains, inputs))
            if svc is default:
                vhosts.append(self.virtual_host(f"{svc.name}.default", svc, ["*"], inputs))
            # A hostless service that is not first on its address answers, in nginx, only requests
            # without a Host; Envoy cannot route on an absent Host (docs/routing-semantics.md).
        if default is None:
            vhosts.append({"name": "grayagent.unknown-host", "domains": ["*"],
                           "routes": [{"name": "unknown-host", "match": {"prefix": "/"},
                                       "direct_response": {"status": 404}}],
                           "typed_per_filter_config": {LUA_FILTER: {"@type": T_LUA_ROUTE, "disabled": True}}})
        config: dict[str, Any] = {
            "@type": T_ROUTES, "name": name, "validate_clusters": True,
            "ignore_port_in_host_matching": True,  # like nginx's server_name; the Host header stays as sent
            "virtual_hosts": vhosts,
            # nginx: proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for (after routing, like here).
            "request_headers_to_add": [{"header": {"key": "x-forwarded-for",
                                                   "value": "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%"},
                                        "append_action": "APPEND_IF_EXISTS_OR_ADD"}],
        }
        if lua:
            script = lua_script(lua, list_strings(services, self.lists))
            config["typed_per_filter_config"] = {LUA_FILTER: {"@type": T_LUA_ROUTE,
                                                              "source_code": {"inline_string": script}}}
        return config

    def listener(self, name: str, listen: Listen) -> dict[str, Any]:
        rds_dir = posixpath.join(self.options.envoy_dir, RDS_DIR)
        hcm: dict[str, Any] = {
            "@type": T_HCM, "stat_prefix": name, "codec_type": "AUTO",
            # The raw path is a routing input: keep it exactly as received, as nginx's $request_uri.
            "normalize_path": False, "merge_slashes": False, "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
            "http_protocol_options": {"accept_http_10": True},
            # nginx drops header names with underscores (underscores_in_headers off).
            "common_http_protocol_options": {"headers_with_underscores_action": "DROP_HEADER"},
            # Headers Envoy would otherwise add before routing (rules on them would then differ from nginx).
            "generate_request_id": False,
            "early_header_mutation_extensions": [{
                "name": "envoy.http.early_header_mutation.header_mutation",
                "typed_config": {"@type": T_EARLY, "mutations": [
                    # Before route selection and before the script: clients never choose their own upstream,
                    # even when the script fails; nor can they steer Envoy with x-envoy-* controls.
                    {"remove_on_match": {"key_matcher": {"prefix": PREFIX}}},
                    {"remove_on_match": {"key_matcher": {"prefix": "x-envoy-"}}},
                ]},
            }],
            "rds": {"route_config_name": name, "config_source": {
                "resource_api_version": "V3",
                "path_config_source": {"path": posixpath.join(self.options.envoy_dir, rds_file(name)),
                                       "watched_directory": {"path": rds_dir}}}},
            "http_filters": [
                # No code here: the script comes with the routes, so a rule change is an RDS-only update.
                {"name": LUA_FILTER, "typed_config": {"@type": T_LUA}},
                {"name": "envoy.filters.http.router",
                 "typed_config": {"@type": T_ROUTER, "suppress_envoy_headers": True}},
            ],
        }
        return {"@type": T_LISTENER, "name": name,
                "address": {"socket_address": {"address": listen.host or ALL_IPV4, "port_value": listen.port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}]}

    def cluster(self, svc: Service, upstream: str, servers: Iterable[str]) -> dict[str, Any]:
        endpoints = []
        all_ips = True
        for server in servers:
            host, _, port = server.rpartition(":")
            host = host.removeprefix("[").removesuffix("]")
            all_ips &= _is_ip(host)
            endpoints.append({"endpoint": {"address": {"socket_address": {"address": host,
                                                                          "port_value": int(port)}}}})
        name = upstream_id(svc, upstream)
        cluster: dict[str, Any] = {
            "@type": T_CLUSTER, "name": name, "connect_timeout": self.options.connect_timeout,
            "type": "STATIC" if all_ips else "STRICT_DNS", "lb_policy": "ROUND_ROBIN",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]}}
        if not all_ips:
            cluster["dns_lookup_family"] = "V4_PREFERRED"
        return cluster


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _dump(data: Any) -> bytes:
    # Compact, so json uses its C encoder: 10,000 services render in a second, not ten.
    return (json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n").encode("ascii")


def _document(label: str, resources_: list[dict[str, Any]]) -> bytes:
    return _dump({"version_info": label, "resources": resources_})


def render(release: Release, version: int, digest: str, options: EnvoyOptions = EnvoyOptions()) -> dict[str, bytes]:
    """The Envoy files of one version: {path relative to options.envoy_dir: content}."""
    label = version_label(version, digest)
    renderer = _Renderer(options, release.lists)
    files: dict[str, bytes] = {}
    listeners = []
    for services in services_by_listen(release).values():
        name = listener_name(services[0].listen)
        listeners.append(renderer.listener(name, services[0].listen))
        files[rds_file(name)] = _document(label, [renderer.route_config(name, services)])
    files[LDS_FILE] = _document(label, listeners)
    files[CDS_FILE] = _document(label, [renderer.cluster(svc, up.name, up.servers)
                                        for svc in release.services for up in svc.upstreams])
    return dict(sorted(files.items()))


def empty_files(label: str = "0-empty") -> dict[str, bytes]:
    """What Envoy reads before the first apply: no listeners, no clusters."""
    return {LDS_FILE: _document(label, []), CDS_FILE: _document(label, [])}


# ---------------------------------------------------------------------------------------------- bootstraps


def _without_type(resource: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k != "@type"}


def validation_bootstrap(files: Mapping[str, bytes]) -> bytes:
    """The same resources as `files`, as a static bootstrap for `envoy --mode validate`.

    Envoy only checks that path-based config files exist; inline, it checks everything it checks when it
    loads them: regexes (and their RE2 size), cluster references, Lua syntax, unknown fields.
    """
    routes = {}
    for path, content in files.items():
        if path.startswith(RDS_DIR + "/"):
            config = json.loads(content)["resources"][0]
            routes[config["name"]] = _without_type(config)
    listeners = []
    for listener in json.loads(files[LDS_FILE])["resources"]:
        listener = _without_type(listener)
        for chain in listener["filter_chains"]:
            for flt in chain["filters"]:
                hcm = flt["typed_config"]
                rds = hcm.pop("rds")
                hcm["route_config"] = routes[rds["route_config_name"]]
        listeners.append(listener)
    clusters = [_without_type(c) for c in json.loads(files[CDS_FILE])["resources"]]
    return _dump({"static_resources": {"listeners": listeners, "clusters": clusters},
                  "layered_runtime": _runtime()})


def _runtime() -> dict[str, Any]:
    return {"layers": [{"name": "static", "static_layer": dict(RUNTIME)}]}


def bootstrap(envoy_dir: str = DEFAULT_ENVOY_DIR, admin_address: str = "127.0.0.1",
              admin_port: int = 9901) -> dict[str, Any]:
    """The bootstrap operators start Envoy with (deploy/envoy/bootstrap.yaml is this, with the defaults)."""

    def source(kind: str) -> dict[str, Any]:
        return {"resource_api_version": "V3", "path_config_source": {
            "path": posixpath.join(envoy_dir, kind, f"{kind}.json"),
            "watched_directory": {"path": posixpath.join(envoy_dir, kind)}}}

    return {
        "node": {"id": "grayagent", "cluster": "grayagent"},
        "admin": {"address": {"socket_address": {"address": admin_address, "port_value": admin_port}}},
        "dynamic_resources": {"lds_config": source("lds"), "cds_config": source("cds")},
        "layered_runtime": _runtime(),
    }
