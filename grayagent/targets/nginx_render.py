"""Render a Release into one nginx config file, meant to be `include`d inside `http {}`.

Pure and deterministic: the same release, version and options give byte-identical output.

How the one meaning of a route (grayagent.rules.routing) becomes nginx:
- every field a rule or split reads becomes a variable: `$http_<name>` for headers, a `map` over `$http_cookie`
  or `$args` with routing.COOKIE_PATTERN / QUERY_PATTERN for cookies and query, a `map` over `$request_uri`
  for the raw path;
- every condition becomes a `map` (or a `geo` for CIDRs) yielding 1 or 0; exact matches use anchored regexes
  because plain `map` keys compare case-insensitively;
- one decision `map` per service over the concatenated condition bits: `map` tries regexes in order, so
  `~^.{a}1{n}` for each rule in order gives "the first rule that holds decides";
- the split is `split_clients` over salt + key, whose murmur2 and boundary arithmetic routing.py mirrors.

Injection safety: document values reach the file only (a) after schema patterns limit them to safe
characters (names, hosts, servers, salts, header/cookie/query names), (b) as `str()` of a parsed IP network,
or (c) inside a double-quoted map regex, where every byte outside [A-Za-z0-9_/:@-] of a literal is written as
`\\xHH`, and user regexes (printable ASCII only) get `\\` and `"` escaped. No document value ever appears where
nginx interpolates variables.
"""

from __future__ import annotations

from dataclasses import dataclass

from grayagent.rules.model import (
    CidrCondition,
    Field,
    IdList,
    Release,
    Service,
    StringMatch,
    ValueCondition,
    iter_value_fields,
)
from grayagent.rules.regexsubset import regex_literal
from grayagent.rules.routing import COOKIE_PATTERN, QUERY_PATTERN, SplitPart, cookie_attributes, split_parts
from grayagent.targets.layout import upstream_id
from grayagent.targets.nginx_server import catch_all_servers, loopback_server, server_names_hash, service_server

VERSION_PATH = "/grayagent/version"


@dataclass(frozen=True, slots=True)
class NginxOptions:
    """Inputs that are not in the document: they belong to the host, not the release."""

    verify_listen: str = "127.0.0.1:18089"
    keepalive: int = 32
    # SO_REUSEPORT lets several nginx instances on one host share a service port (side-by-side instances,
    # or a test fleet). Off by default: on reload, connections queued on the old workers' sockets are reset.
    reuseport: bool = False
    # Per-request JSON lines for the rollout controller's figures (the agent tails this file); "" = off.
    # A host path, never a document value; NginxTarget checks it is a plain absolute path.
    access_log: str = ""


# $proxy_host is the upstream block actually chosen (grayagent.<service>.<upstream>), so the log names the
# logical upstream without one variable per service. escape=json keeps every line valid JSON.
ACCESS_LOG_FORMAT = ("log_format grayagent_json escape=json "
                     "'{\"u\":\"$proxy_host\",\"st\":\"$status\",\"rt\":\"$request_time\","
                     "\"urt\":\"$upstream_response_time\"}';\n")


def quote(text: str) -> str:
    """A double-quoted nginx string; nginx unescapes exactly \\\\ and \\" (and \\t \\n \\r, never produced)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


upstream_block_name = upstream_id


def _field_var(fld: Field) -> str:
    if fld.kind == "header":
        return "$ga_h_" + fld.name.replace("-", "_")  # $http_<name> without its spaces and tabs (_extraction_maps)
    if fld.kind == "path":
        return "$ga_path"
    prefix = "ga_ck_" if fld.kind == "cookie" else "ga_arg_"
    return "$" + prefix + fld.name.encode().hex()


def _extraction_maps(release: Release) -> list[str]:
    out: list[str] = []
    fields = list(iter_value_fields(release))
    if any(f.kind == "path" for f in fields):
        out.append('map $request_uri $ga_path {\n    "~^([^?]*)" $1;\n    default "";\n}\n')
    # nginx 1.22 keeps a header value's leading tabs (it skips only spaces): strip spaces and tabs at both
    # ends, as docs/routing-semantics.md §1 says, so "\ttrue" matches exact "true" and "\t" is absent.
    for var, name in dict.fromkeys((_field_var(f), f.name) for f in fields if f.kind == "header"):
        out.append(f"# header {name}\nmap $http_{name.replace('-', '_')} {var} {{\n"
                   '    "~^[ \\x09]*(.*?)[ \\x09]*$" $1;\n    default "";\n}\n')
    for fld in fields:
        if fld.kind not in ("cookie", "query"):
            continue
        source, pattern = ("$http_cookie", COOKIE_PATTERN) if fld.kind == "cookie" else ("$args", QUERY_PATTERN)
        regex = pattern.format(name=regex_literal(fld.name))
        out.append(f"# {fld.kind} {fld.name}\nmap {source} {_field_var(fld)} {{\n"
                   f"    {quote('~' + regex)} $1;\n    default \"\";\n}}\n")
    return out


def _matcher_lines(match: StringMatch) -> list[str]:
    if match.kind == "present":
        return ['"" 1;', "default 0;"] if not match.present else ['"" 0;', "default 1;"]
    if match.kind == "regex":
        keys = ["~" + match.values[0]]
    elif match.kind == "prefix":
        keys = ["~^" + regex_literal(match.values[0])]
    else:  # exact, in
        keys = ["~^" + regex_literal(v) + "\\z" for v in match.values]
    # An empty value counts as absent, and never matches a regex (exact keys are tried before regexes).
    return ['"" 0;', *(f"{quote(k)} 1;" for k in keys), "default 0;"]


def upstream_blocks(svc: Service, keepalive: int) -> list[str]:
    """One upstream block per upstream of a service; reload and dynamic mode render them alike."""
    out = []
    for up in svc.upstreams:
        servers = "".join(f"    server {s};\n" for s in up.servers)
        out.append(f"upstream {upstream_block_name(svc, up.name)} {{\n{servers}    keepalive {keepalive};\n}}\n")
    return out


def _service_blocks(index: int, svc: Service, options: NginxOptions, first_on_listen: bool = False,
                    release_lists: tuple[IdList, ...] = ()) -> list[str]:
    var = f"ga_s{index}"
    out: list[str] = [f"# ---- service {svc.name} (variables ${var}_*)\n"]
    out.extend(upstream_blocks(svc, options.keepalive))

    bits: list[str] = []
    rule_patterns: list[tuple[str, str, str]] = []  # (regex over the bits, upstream, rule name)
    for rule in svc.rules:
        start = len(bits)
        for cond in rule.conditions:
            cvar = f"{var}_c{len(bits)}"
            if isinstance(cond, ValueCondition) and cond.match.kind == "list":
                out.append(list_condition_map(release_lists, cond, f"${cvar}", rule.name))
            elif isinstance(cond, ValueCondition):
                body = "".join(f"    {line}\n" for line in _matcher_lines(cond.match))
                out.append(f"# rule {rule.name}: {cond.field.kind} {cond.field.name}".rstrip() + "\n"
                           f"map {_field_var(cond.field)} ${cvar} {{\n{body}}}\n")
            elif isinstance(cond, CidrCondition):
                nets = "".join(f"    {net} 1;\n" for net in cond.networks)
                out.append(f"# rule {rule.name}: source address\ngeo ${cvar} {{\n    default 0;\n{nets}}}\n")
            bits.append(f"${{{cvar}}}")
        skip = f".{{{start}}}" if start else ""
        rule_patterns.append((f"~^{skip}1{{{len(bits) - start}}}", rule.to, rule.name))

    split = svc.split
    fallback = upstream_block_name(svc, svc.default)
    key_missing = fallback
    source = "".join(bits)
    if split is not None:
        parts = split_parts(split)
        if len(parts) == 1:
            fallback = upstream_block_name(svc, parts[0].upstream)
            if split.key is None or split.when_key_missing == "random":
                key_missing = fallback  # with a key, a missing one still means the default upstream
        else:
            lines = _split_clients_lines(svc, parts)
            if split.key is not None:
                out.append(f'split_clients "{split.salt}${{{_field_var(split.key)[1:]}}}" ${var}_split {{\n{lines}}}\n')
                fallback = f"${var}_split"
            if (split.key is None and split.anonymous_cookie is None) or split.when_key_missing == "random":
                out.append(f'split_clients "${{request_id}}" ${var}_rsplit {{\n{lines}}}\n')
                key_missing = f"${var}_rsplit"
                if split.key is None:
                    fallback = key_missing
        if split.key is not None:
            out.append(f'map {_field_var(split.key)} ${var}_k {{\n    "" 0;\n    default 1;\n}}\n')
            source += f":${{{var}_k}}"
            rule_patterns.append(("~:0$", "", ""))
        if split.anonymous_cookie is not None:
            key_missing = _anonymous_visitor(out, var, svc, parts)
            if split.key is None:
                fallback = key_missing

    entries = []
    rule_entries = []
    for pattern, to, name in rule_patterns:
        target = upstream_block_name(svc, to) if to else key_missing
        entries.append(f"    {quote(pattern)} {target};\n")
        rule_entries.append(f"    {quote(pattern)} {name or '-'};\n")
    target = fallback
    if rule_patterns:
        out.append(f'map "{source}" ${var}_up {{\n{"".join(entries)}    default {fallback};\n}}\n')
        out.append(f'map "{source}" ${var}_rule {{\n{"".join(rule_entries)}    default -;\n}}\n')
        target = f"${var}_up"

    set_cookie = _set_cookie(out, var, svc, source, rule_patterns)
    out.append(service_server(svc, options.reuseport and first_on_listen, options.access_log,
                              set_cookie + f"        proxy_pass http://{target};\n"))
    return out


def _split_clients_lines(svc: Service, parts: tuple[SplitPart, ...]) -> str:
    """The body of a split_clients block: nginx's percentages, the last part `*`."""
    return "".join(f"    {'*' if p.boundary is None else f'{p.hundredths // 100}.{p.hundredths % 100:02d}%'} "
                   f"{upstream_block_name(svc, p.upstream)};\n" for p in parts)


# ---------------------------------------------------------------------------------------------- anonymous visitors
# whenKeyMissing: cookie (routing.anonymous_split). Per service `var`:
#   $<var>_ack     the first anonymous cookie's raw value (routing.COOKIE_PATTERN, as every cookie field);
#   $<var>_aid     the well-formed ID in it (routing.anonymous_id), else $request_id: 16 random
#                  bytes as 32 lowercase hex digits, the same form, and one value per request (cacheable);
#   $<var>_asplit  split_clients over salt + ID, the same cut as the key's;
#   $<var>_anew    the Set-Cookie value for $request_id when the cookie holds no ID, else "";
#   $<var>_setck   $<var>_anew when the anonymous path decided (no rule, no key), else "": `add_header` sends
#                  nothing for an empty value (ngx_http_add_header: `if (value->len)`), and adds to what the
#                  upstream sent rather than replacing its own Set-Cookie headers.
_ANON_ID_KEY = "~^[ \\x09]*([0-9a-f]{32})[ \\x09]*\\z"
EMPTY = '""'  # an nginx empty string


def _anonymous_visitor(out: list[str], var: str, svc: Service, parts: tuple[SplitPart, ...]) -> str:
    """Append the maps that read and assign the visitor's ID; return where a keyless request goes."""
    assert svc.split is not None and svc.split.anonymous_cookie is not None
    split, cookie = svc.split, svc.split.anonymous_cookie
    extract = quote("~" + COOKIE_PATTERN.format(name=regex_literal(cookie.name)))
    new_cookie = quote(f"{cookie.name}=$request_id{cookie_attributes(cookie)}")
    out.append(f"# anonymous visitors: cookie {cookie.name}\n"
               f"map $http_cookie ${var}_ack {{\n    {extract} $1;\n    default \"\";\n}}\n"
               f"map ${var}_ack ${var}_aid {{\n    {quote(_ANON_ID_KEY)} $1;\n    default $request_id;\n}}\n"
               f"map ${var}_ack ${var}_anew {{\n    {quote(_ANON_ID_KEY)} \"\";\n    default {new_cookie};\n}}\n")
    if len(parts) == 1:
        return upstream_block_name(svc, parts[0].upstream)
    out.append(f'split_clients "{split.salt}${{{var}_aid}}" ${var}_asplit {{\n{_split_clients_lines(svc, parts)}}}\n')
    return f"${var}_asplit"


def _set_cookie(out: list[str], var: str, svc: Service, source: str,
                rule_patterns: list[tuple[str, str, str]]) -> str:
    """The location's add_header line for the anonymous cookie ("" without one), and the map it reads."""
    split = svc.split
    if split is None or split.anonymous_cookie is None:
        return ""
    new = f"${var}_anew"
    if rule_patterns:
        # The decision map's own patterns: a rule's -> nothing; the missing key's (keyless: the default) -> new.
        entries = "".join(f"    {quote(pattern)} {EMPTY if to else new};\n" for pattern, to, _ in rule_patterns)
        out.append(f'map "{source}" ${var}_setck {{\n{entries}    default {EMPTY if split.key else new};\n}}\n')
        new = f"${var}_setck"
    return f"        add_header Set-Cookie {new} always;\n"


def render(release: Release, version: int, digest: str, options: NginxOptions = NginxOptions()) -> str:
    head = (f"# Generated by grayagent. Do not edit: the agent replaces this file.\n"
            f"# release {release.name} version {version} digest {digest}\n\n")
    body: list[str] = _extraction_maps(release)
    hash_sizes = server_names_hash(release)
    if hash_sizes:
        body.insert(0, hash_sizes)
    if release.lists:
        body[:0] = list_maps(release)  # map_hash_* first: nginx sizes each map's hash when it reads the block
    if options.access_log:
        body.insert(0, ACCESS_LOG_FORMAT)
    seen_listens: set[str] = set()
    for index, svc in enumerate(release.services):
        first = str(svc.listen) not in seen_listens  # nginx takes reuseport once per address
        seen_listens.add(str(svc.listen))
        body.extend(_service_blocks(index, svc, options, first, release.lists))
    body.extend(catch_all_servers(release))
    body.append(loopback_server(
        "The agent reads this to verify which version the running workers serve.", options.verify_listen,
        f"    location = {VERSION_PATH} {{\n"
        "        default_type text/plain;\n"
        f'        return 200 "{version} {digest}\\n";\n'
        "    }\n"))
    return head + "\n".join(body)


# ---------------------------------------------------------------------------------------------- ID lists
#
# A `list` condition is two maps. nginx's map hashes its keys lowercased (ngx_hash_add_key) and looks values
# up lowercased (ngx_http_map_find: ngx_hash_strlow), so the hash alone would take "ABC" for "abc":
# 1. one map per (list, field): the value -> "\t" + every ID of the list equal to it up to ASCII case,
#    tab-separated (IDs hold no control characters), "" when none: one hash lookup;
# 2. one map per condition over "<that>\t\t<value>": a regex holds only when one of those IDs is
#    byte-equal to the value (PCRE's backreference is case-sensitive). A value not in the list gives
#    "\t\t..." , which the anchored regex refuses at its second byte: O(1); otherwise O(ID length).
# Every key is written `"\\<ID>"`: map strips one leading backslash and then reads the rest literally, so
# no ID can be read as `default`, `include`, `hostnames`, `volatile`, a `~` regex or a `\\` escape. Map
# values are nginx complex values: a `$` in an ID is written `${ga_dollar}` (a geo variable holding "$").

_LIST_MATCH = "~^(?:\\t[^\\t]++)*?\\t([^\\t]++)(?:\\t[^\\t]++)*+\\t\\t\\1\\z"
_PTR = 8  # sizeof(void *) in ngx_hash


def _list_var(lists: tuple[IdList, ...], name: str, fld: Field) -> str:
    index = next(i for i, lst in enumerate(lists) if lst.name == name)
    return f"$ga_l{index}_{_field_var(fld)[1:]}"


def _map_value(text: str) -> str:
    """Text inside a double-quoted nginx map value: \\ and \" escaped, $ through ${ga_dollar}."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "${ga_dollar}")


def _hash_elt(key: bytes) -> int:
    """NGX_HASH_ELT_SIZE: a pointer and the key with its 2-byte length, pointer-aligned."""
    return _PTR + (len(key) + 2 + _PTR - 1) // _PTR * _PTR


def _hash_sizes(lists: tuple[IdList, ...]) -> str:
    """map_hash_* for the largest list: about one key per bucket (nginx starts its search 1000 below
    max_size once max_size > 10000), each bucket room for 12 of the longest keys, so that a table is found
    at once (12 keys in one bucket at load 1 happens with odds below 1e-9 per bucket)."""
    largest = max(len(lst.values) for lst in lists)
    longest = max(_hash_elt(v.encode("utf-8")) for lst in lists for v in lst.values)
    bucket = (12 * longest + _PTR + 63) // 64 * 64
    max_size = max(2048, largest + 1024)
    return (f"# Sized for this document's ID lists.\n"
            f"map_hash_bucket_size {bucket};\nmap_hash_max_size {max_size};\n")


def list_maps(release: Release) -> list[str]:
    """The hash sizes, the $ga_dollar helper and one lookup map per (list, field) the rules use."""
    used: dict[tuple[str, Field], None] = {}
    for svc in release.services:
        for rule in svc.rules:
            for cond in rule.conditions:
                if isinstance(cond, ValueCondition) and cond.match.kind == "list":
                    used.setdefault((cond.match.values[0], cond.field))
    if not used:
        return []
    out = [_hash_sizes(release.lists), 'geo $ga_dollar {\n    default "$";\n}\n']
    by_name = {lst.name: lst for lst in release.lists}
    for name, fld in used:
        values = by_name[name].values
        # Fast path for the usual IDs: one scan of the whole list instead of escaping each ID.
        joined = "\n".join(values)
        plain = not any(c in joined for c in '\\"$')
        groups: dict[str | bytes, list[str]] = {}
        for value in values:  # nginx lowercases ASCII only (ngx_tolower); str.lower() does that for ASCII text
            groups.setdefault(value.lower() if value.isascii() else value.encode("utf-8").lower(), []).append(value)
        tab = "\\t"  # nginx reads \t in a quoted string as a tab
        if plain:
            lines = [f'    "\\\\{ids[0]}" "{tab}{tab.join(ids)}";\n' for ids in groups.values()]
        else:
            lines = [f'    {quote(chr(92) + ids[0])} "{tab}{tab.join(map(_map_value, ids))}";\n'
                     for ids in groups.values()]
        out.append(f"# list {name}: {fld.kind} {fld.name}".rstrip() + "\n"
                   f"map {_field_var(fld)} {_list_var(release.lists, name, fld)} {{\n{''.join(lines)}"
                   '    default "";\n}\n')
    return out


def list_condition_map(lists: tuple[IdList, ...], cond: ValueCondition, var: str, rule: str) -> str:
    """The condition bit: 1 when the field's value is byte-equal to an ID of the list."""
    found = _list_var(lists, cond.match.values[0], cond.field)
    return (f"# rule {rule}: {cond.field.kind} {cond.field.name} in list {cond.match.values[0]}\n"
            f'map "${{{found[1:]}}}\\t\\t${{{_field_var(cond.field)[1:]}}}" {var} {{\n'
            f"    {quote(_LIST_MATCH)} 1;\n    default 0;\n}}\n")
