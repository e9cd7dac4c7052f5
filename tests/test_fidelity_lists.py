"""Named ID lists mean the same in nginx (reload and dynamic mode), Envoy and `grayagent route`.

One document tests a list on a header, a cookie, a query parameter and the path, and combines a list with
another condition. The lists hold IDs that differ only in case (nginx's map hash is case-insensitive),
IDs that nginx's map syntax would read as keywords or regexes (`default`, `include`, `~x`, `\\`), quotes,
`;`, braces, `$` variables, unicode and a 256-byte ID. 4,000 seeded requests send members, their case
variants, prefixes and extensions, empty and absent values, and hostile non-members.
"""

from __future__ import annotations

import random
from typing import Any

from grayagent.rules.model import parse_document
from tests.agenthelp import dynamic_target, nginx_target, wait_live
from tests.docs import document, dump, service
from tests.envoyhelp import envoy_target, wait_target_live
from tests.fidelity import FidelityRequest, send_all
from tests.servers.proc import free_port
from tests.test_fidelity_three_way import _apply, _with_ports, envoy, lua_nginx  # noqa: F401 - fixtures

UPSTREAMS = ("stable", "canary", "beta")
HOSTILE = ["default", "include", "hostnames", "volatile", "~x", "~*X", "\\", "\\default", '"', "'", ";", "{", "}",
           "$x", "$host", "${ga_dollar}", "a b", "#hash", "中文", "ümlaut-Ä", "😀", "x" * 256, "%00", "a:b",
           "a\\tb", "\\t", "Abc", "abc", "XyZ", "MiXeD-9", "mixed-9"]
NUMERIC = [str(10_000_000 + i * 7) for i in range(300)]
# Query values and paths travel on the request line: printable ASCII without spaces, '#', '&' or '?'.
QUERY_IDS = ["Q1", "q1", "default", "~x", "%24x", "a;b", "u-42", "U-42", "x" * 200]
PATHS = ["/beta", "/Beta", "/a/b", "/%7Euser", "/default"]


def lists_document(ports: dict[str, int], listen: int) -> dict[str, Any]:
    servers = {name: [f"127.0.0.1:{ports[name]}"] for name in UPSTREAMS}
    svc = service("ids", listen=f"127.0.0.1:{listen}", servers=servers, rules=[
        {"name": "staff", "match": {"headers": {"X-User-Id": {"list": "staff"}, "X-Employee": {"exact": "1"}}},
         "to": "beta"},
        {"name": "beta-header", "match": {"headers": {"X-User-Id": {"list": "beta"}}}, "to": "canary"},
        {"name": "vip-cookie", "match": {"cookies": {"uid": {"list": "beta"}}}, "to": "beta"},
        {"name": "query", "match": {"query": {"uid": {"list": "query-ids"}}}, "to": "canary"},
        {"name": "paths", "match": {"path": {"list": "paths"}}, "to": "beta"},
        {"name": "other-header", "match": {"headers": {"X-Other": {"list": "beta"}}}, "to": "beta"},
    ], split={"key": {"header": "X-User-Id"}, "salt": "lists", "weights": {"stable": 60, "canary": 40}})
    doc = document(svc, name="lists")
    doc["spec"]["lists"] = {"beta": {"values": HOSTILE + NUMERIC}, "staff": {"values": NUMERIC[:20]},
                            "query-ids": {"values": QUERY_IDS}, "paths": {"values": PATHS},
                            "unused": {"values": ["never-rendered"]}}
    return doc


def _variants(value: str, rng: random.Random) -> list[str]:
    return [value, value.upper(), value.lower(), value.swapcase(), value[:-1], value + "x", "x" + value,
            value + value[-1:], rng.choice(["", " ", "\t"])]


def lists_requests(n: int, seed: int = 151515) -> list[FidelityRequest]:
    rng = random.Random(seed)
    out: list[FidelityRequest] = []
    members = HOSTILE + NUMERIC[:40]
    for i in range(n):
        req = FidelityRequest("ids", "/")
        kind = i % 5
        if kind == 0:
            req.headers.append(("X-User-Id", rng.choice(_variants(rng.choice(members), rng))))
            if rng.random() < 0.4:
                req.headers.append(("X-Employee", rng.choice(["1", "0"])))
        elif kind == 1:
            value = rng.choice(_variants(rng.choice(members), rng)).replace(";", "")
            req.headers.append(("Cookie", f"a=1; uid={value}" if rng.random() < 0.5 else f"uid={value}"))
        elif kind == 2:
            value = rng.choice([v for v in _variants(rng.choice(QUERY_IDS), rng) if v.strip() == v])
            req.path = "/q?" + rng.choice([f"uid={value}", f"x=1&uid={value}", "uid=", "xuid=Q1"])
        elif kind == 3:
            req.path = rng.choice([p for p in _variants(rng.choice(PATHS), rng) if p.startswith("/")] + ["/"])
        else:
            req.headers.append(("X-Other", rng.choice(_variants(rng.choice(members), rng))))
            req.headers.append(("X-User-Id", f"u{rng.getrandbits(40):x}"))
        out.append(req)
    # Every hostile ID and its case variants, as a header, at least once.
    for value in HOSTILE:
        for variant in dict.fromkeys((value, value.upper(), value.lower())):
            out.append(FidelityRequest("ids", "/", [("X-User-Id", variant)]))
    return out


def test_lists_agree_in_every_target(nginx, lua_nginx, envoy, backends) -> None:  # noqa: F811 - fixtures
    backend_ports = {n: b.port for n, b in backends.items()}
    ports = {"nginx": free_port(), "envoy": free_port(), "dynamic": free_port()}
    doc = lists_document(backend_ports, ports["nginx"])
    listen = {name: {"ids": port} for name, port in ports.items()}

    _apply(nginx_target(nginx), doc)
    wait_live(nginx, 1)
    target = envoy_target(envoy)
    _apply(target, _with_ports(doc, listen["envoy"]))
    wait_target_live(target, 1)
    if lua_nginx is not None:
        _apply(dynamic_target(lua_nginx), _with_ports(doc, listen["dynamic"]))

    release = parse_document(dump(doc), "lists")
    reqs = lists_requests(4000)
    expected = [r.simulate(release).upstream for r in reqs]
    via_nginx = send_all(reqs, {"ids": ports["nginx"]})
    via_envoy = send_all(reqs, {"ids": ports["envoy"]})
    via_dynamic = send_all(reqs, {"ids": ports["dynamic"]}) if lua_nginx is not None else via_nginx
    disagree = [(r, e, n, d, v) for r, e, n, d, v in zip(reqs, expected, via_nginx, via_dynamic, via_envoy,
                                                         strict=True) if not e == n == d == v]
    assert not disagree, (f"{len(disagree)} of {len(reqs)} disagree (request, simulator, nginx reload, nginx "
                          f"dynamic, envoy); first: {disagree[:3]}")

    # The corpus exercises every rule, case twins on both sides, and hostile members that match.
    decisions = [r.simulate(release) for r in reqs]
    assert {d.rule for d in decisions if d.by == "rule"} == {r.name for r in release.services[0].rules}
    hits = {h[1] for r, d in zip(reqs, decisions, strict=True) if d.rule == "beta-header"
            for h in r.headers if h[0] == "X-User-Id"}
    assert {"Abc", "abc", "default", "include", "~x", "\\", '"', "$x", "中文"} <= hits
    misses = {h[1] for r, d in zip(reqs, decisions, strict=True) if d.rule != "beta-header" and d.rule != "staff"
              for h in r.headers if h[0] == "X-User-Id"}
    assert {"ABC", "xyz", "DEFAULT", ""} <= misses
