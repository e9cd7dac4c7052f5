"""The Envoy renderer is pure: golden files pin its output, real `envoy --mode validate` accepts it, document
values stay inside their JSON and Lua strings, and the shipped bootstrap is the one the code describes.

Regenerate the goldens after an intended change with: UPDATE_GOLDEN=1 pytest tests/test_envoy_render.py
"""

from __future__ import annotations

import http.client
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from grayagent.rules.model import parse_document
from grayagent.stores.base import digest_of
from grayagent.targets.envoy_render import (
    EnvoyOptions,
    bootstrap,
    lua_literal,
    lua_string,
    render,
    validation_bootstrap,
)
from tests.docs import document, dump, service
from tests.servers.envoy import SHIPPED_BOOTSTRAP, EnvoyProcess
from tests.servers.proc import free_port

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "rules.yaml").exists())
OPTIONS = EnvoyOptions(envoy_dir="/var/lib/grayagent/envoy")

HOSTILE = ['"', "'", "]]", "]=]", "[[x]]", "\\", "\\\\n", "\n", "\r\n", "\t", "\x00", "a\x00b", "\\049", "\\0",
           '";os.exit(1)--', "]]..os.exit(1)..[[", "é中😀", "x" * 1024, "".join(chr(i) for i in range(1, 128))]


def _render(case: str) -> dict[str, bytes]:
    content = (GOLDEN / case / "rules.yaml").read_bytes()
    return render(parse_document(content, f"{case}/rules.yaml"), 7, digest_of(content), OPTIONS)


def _pretty(content: bytes) -> bytes:
    """Goldens are stored indented, so that a change reads as a diff; the renderer writes compact JSON."""
    return (json.dumps(json.loads(content), sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode()


@pytest.mark.parametrize("case", CASES)
def test_render_matches_golden(case: str) -> None:
    files = {path: _pretty(content) for path, content in _render(case).items()}
    golden = GOLDEN / case / "envoy"
    if os.environ.get("UPDATE_GOLDEN"):
        for old in golden.rglob("*.json"):
            old.unlink()
        for path, content in files.items():
            (golden / path).parent.mkdir(parents=True, exist_ok=True)
            (golden / path).write_bytes(content)
    on_disk = {str(p.relative_to(golden)): p.read_bytes() for p in golden.rglob("*.json")}
    assert on_disk == files, f"render of {case} changed; review the diff and UPDATE_GOLDEN=1 if intended"


@pytest.mark.parametrize("case", CASES)
def test_render_is_deterministic_and_printable_ascii(case: str) -> None:
    files = _render(case)
    assert files == _render(case)
    for content in files.values():
        assert all(b == 0x0A or 0x20 <= b < 0x7F for b in content)
        json.loads(content)


@pytest.mark.parametrize("case", CASES)
def test_real_envoy_validates_every_golden_case(case: str, tmp_path: Path) -> None:
    candidate = tmp_path / "candidate.json"
    candidate.write_bytes(validation_bootstrap(_render(case)))
    ok, output = EnvoyProcess.validate(candidate)
    assert ok, output


def test_validate_catches_what_the_files_alone_would_not(tmp_path: Path) -> None:
    # A 1000-value `in` list of long values is a valid document, but its RE2 program is too big for Envoy.
    doc = document(service(rules=[{"name": "many", "match": {"headers": {"X-A": {"in": [
        f"{i:04d}" + "v" * 200 for i in range(1000)]}}}, "to": "canary"}]))
    content = dump(doc)
    files = render(parse_document(content, "big"), 1, digest_of(content), OPTIONS)
    candidate = tmp_path / "candidate.json"
    candidate.write_bytes(validation_bootstrap(files))
    ok, output = EnvoyProcess.validate(candidate)
    assert not ok and "program size" in output.lower(), output


def test_shipped_bootstrap_is_the_rendered_one() -> None:
    assert yaml.safe_load(SHIPPED_BOOTSTRAP.read_text()) == bootstrap()


# ---------------------------------------------------------------------------------------------- hostile values


def _lua_decode(literal: str) -> bytes:
    """Decode one double-quoted Lua string as lua_string writes it; fail on anything else."""
    assert literal[0] == literal[-1] == '"'
    out = bytearray()
    i = 1
    while i < len(literal) - 1:
        ch = literal[i]
        assert ch not in "\"'\n\r[]", f"raw {ch!r} inside a Lua string"
        if ch == "\\":
            digits = literal[i + 1:i + 4]
            assert re.fullmatch(r"\d{3}", digits), digits
            out.append(int(digits))
            i += 4
        else:
            out.append(ord(ch))
            i += 1
    return bytes(out)


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_lua_strings_hold_any_bytes(value: str) -> None:
    literal = lua_string(value)
    assert re.fullmatch(r'"[A-Za-z0-9 _./:@\\-]*"', literal), literal
    assert _lua_decode(literal) == value.encode("utf-8")


def test_lua_literal_structure() -> None:
    assert lua_literal({"a]]": [1, "x", None, True], "b": {"c": 2}}) == \
        '{["a\\093\\093"] = {1, "x", nil, true}, ["b"] = {["c"] = 2}}'


def test_hostile_document_values_stay_inside_their_strings() -> None:
    files = _render("hostile")
    routes = json.loads(files["rds/grayagent_any_18080.json"])["resources"][0]
    vhost = routes["virtual_hosts"][0]
    assert [r["name"] for r in vhost["routes"]] == [
        "api/rule/quotes", "api/rule/braces", "api/rule/variables", "api/rule/newline", "api/rule/unicode",
        "api/rule/regex-quotes", "api/default"]
    matchers = {r["name"]: r["match"]["headers"][0]["string_match"] for r in vhost["routes"][:-1]}
    assert matchers["api/rule/quotes"] == {"exact": 'a"; return 200 "pwned"; #'}
    assert matchers["api/rule/newline"] == {"exact": "line1\\nline2\\r\\n\tend"}
    assert matchers["api/rule/unicode"] == {"exact": "/caf\u00e9/\u4e2d\u6587 \U0001F600"}
    assert matchers["api/rule/variables"] == {"prefix": "$host${request_uri}\\"}
    # `in` values become \xHH escapes: nothing of them survives as regex syntax.
    assert matchers["api/rule/braces"]["safe_regex"]["regex"] == \
        "(?:\\x7d\\x20server\\x20\\x7b\\x20listen\\x201\\x20\\x7d|\\x7b)"
    script = routes["typed_per_filter_config"]["envoy.filters.http.lua"]["source_code"]["inline_string"]
    config = "\n".join(line for line in script.splitlines() if "SERVICES[k] = v" in line)
    # The only data in the script: names the schema restricts, and numbers.
    strings = re.findall(r'"(?:[^"\\]|\\.)*"', config)
    assert all(re.fullmatch(r'"[a-z0-9.\-]*"', s) for s in strings), strings


def test_lua_decodes_hostile_strings_exactly_in_real_envoy(tmp_path: Path) -> None:
    """Envoy's LuaJIT reads lua_literal back to the same bytes, for every hostile value."""
    port, admin = free_port(), free_port()
    code = (f"local S = {lua_literal(HOSTILE)}\n"
            "function envoy_on_request(h)\n"
            "  local i = tonumber(h:headers():get('x-i'))\n"
            "  h:respond({[':status'] = '200'}, S[i])\n"
            "end\n")
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager",
           "stat_prefix": "t",
           "route_config": {"virtual_hosts": [{"name": "a", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "direct_response": {"status": 500}}]}]},
           "http_filters": [{"name": "envoy.filters.http.lua", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
               "default_source_code": {"inline_string": code}}},
               {"name": "envoy.filters.http.router", "typed_config": {
                   "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    config = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
              "static_resources": {"listeners": [{
                  "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                  "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                  "typed_config": hcm}]}]}]}}
    path = tmp_path / "lua.json"
    path.write_text(json.dumps(config))
    with EnvoyProcess(path, admin, tmp_path):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for i, value in enumerate(HOSTILE, start=1):
            conn.request("GET", "/", headers={"x-i": str(i)})
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, value.encode("utf-8")), i


def test_ten_thousand_services_on_one_listener_validate(tmp_path: Path) -> None:
    """One Lua script holds every service of a listener; LuaJIT caps a function at 65,536 constants."""
    services = [service(f"s{i}", listen=8080, hosts=[f"h{i}.example.com"], rules=[
        {"name": "r", "match": {"headers": {"X-A": {"exact": f"v{i}"}}, "cookies": {"c": {"prefix": "p"}}},
         "to": "canary"}], split={"key": {"header": "X-U"}, "weights": {"stable": 90, "canary": 10}})
        for i in range(10_000)]
    content = dump(document(*services))
    files = render(parse_document(content, "big"), 1, digest_of(content), OPTIONS)
    candidate = tmp_path / "candidate.json"
    candidate.write_bytes(validation_bootstrap(files))
    ok, output = EnvoyProcess.validate(candidate)
    assert ok, output[-2000:]
