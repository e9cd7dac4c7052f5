"""Pure checks of the routing meaning. Agreement with real nginx is in test_nginx_fidelity.py."""

from __future__ import annotations

import collections
import random
from pathlib import Path

from grayagent.rules.model import Split, parse_document
from grayagent.rules.routing import SPLIT_RANGE, Request, field_value, murmur2, pick_part, route, split_parts
from tests.agenthelp import grayagent
from tests.docs import document, dump, service


def test_murmur2_reference_vectors() -> None:
    # ngx_murmur_hash2 values; the same keys are checked against a live nginx in test_nginx_fidelity.py.
    assert murmur2(b"") == 0
    assert murmur2(b"abc") == 0x13577C9B
    assert murmur2(b"hello world") == 0x44A81419


def test_split_boundaries_follow_split_clients_arithmetic() -> None:
    split = Split(None, "s", (("a", 1234), ("zero", 0), ("b", 8766)), "default")
    parts = split_parts(split)
    assert [p.upstream for p in parts] == ["a", "b"]  # zero weights are left out, like nginx requires
    assert parts[0].boundary == 1234 * SPLIT_RANGE // 10000
    assert parts[1].boundary is None  # the last part is '*'
    assert pick_part(parts, parts[0].boundary - 1) == "a"
    assert pick_part(parts, parts[0].boundary) == "b"
    assert pick_part(parts, 0xFFFFFFFF) == "b"  # nginx without '*' would return "" here


def test_blue_green_and_full_weights() -> None:
    assert [p.upstream for p in split_parts(Split(None, "", (("blue", 0), ("green", 10000)), "default"))] == ["green"]


def _svc(**extra):
    return parse_document(dump(document(service(**extra))), "t").services[0]


def test_first_matching_rule_decides_and_conditions_are_anded() -> None:
    svc = _svc(servers={"stable": ["h:1"], "canary": ["h:2"], "beta": ["h:3"]}, rules=[
        {"name": "both", "match": {"headers": {"X-A": {"exact": "1"}}, "cookies": {"c": {"prefix": "v"}}}, "to": "beta"},
        {"name": "a", "match": {"headers": {"x-a": {"in": ["1", "2"]}}}, "to": "canary"},
    ])
    assert route(svc, Request.build(headers={"X-A": "1"}, cookies={"c": "v2"})).rule == "both"
    assert route(svc, Request.build(headers={"X-A": "1"})).rule == "a"
    assert route(svc, Request.build(headers={"X-A": "3"})).by == "default"


def test_field_extraction_semantics() -> None:
    req = Request.build(headers={"Cookie": "xuid=1; uid=abc;uid=second"}, path="/p%20q/r?a=1&uid=x&uid=y")
    from grayagent.rules.model import Field
    assert field_value(Field("cookie", "uid"), req) == "abc"  # first occurrence, exact name
    assert field_value(Field("query", "uid"), req) == "x"
    assert field_value(Field("path"), req) == "/p%20q/r"  # raw, not decoded
    assert field_value(Field("cookie", "UID"), req) == ""  # cookie names are case-sensitive


def test_empty_value_counts_as_absent() -> None:
    svc = _svc(rules=[{"name": "rx", "match": {"headers": {"X-A": {"regex": ".*"}}}, "to": "canary"},
                      {"name": "absent", "match": {"headers": {"X-B": {"present": False}}}, "to": "canary"}])
    assert route(svc, Request.build(headers={"X-A": "", "X-B": "1"})).by == "default"
    assert route(svc, Request.build(headers={"X-A": "x"})).rule == "rx"
    assert route(svc, Request.build(headers={"X-B": ""})).rule == "absent"


def test_source_cidrs() -> None:
    svc = _svc(rules=[{"name": "office", "match": {"sourceCIDRs": ["10.1.0.0/16", "2001:db8::/32"]}, "to": "canary"}])
    assert route(svc, Request.build(source_ip="10.1.200.3")).rule == "office"
    assert route(svc, Request.build(source_ip="::ffff:10.1.2.3")).rule == "office"  # as nginx geo and Lua read it
    assert route(svc, Request.build(source_ip="2001:db8::1")).rule == "office"
    assert route(svc, Request.build(source_ip="10.2.0.1")).by == "default"
    assert route(svc, Request.build(source_ip="garbage")).by == "default"


def test_sticky_split_is_sticky_and_salted() -> None:
    svc = _svc(split={"key": {"cookie": "uid"}, "weights": {"stable": 50, "canary": 50}})
    first = {u: route(svc, Request.build(cookies={"uid": u})).upstream for u in map(str, range(200))}
    again = {u: route(svc, Request.build(cookies={"uid": u})).upstream for u in map(str, range(200))}
    assert first == again
    resalted = _svc(split={"key": {"cookie": "uid"}, "salt": "other", "weights": {"stable": 50, "canary": 50}})
    moved = sum(route(resalted, Request.build(cookies={"uid": u})).upstream != first[u] for u in first)
    assert 50 < moved < 150


def test_key_missing_goes_to_default_or_random() -> None:
    svc = _svc(split={"key": {"header": "X-Uid"}, "weights": {"stable": 1, "canary": 99}})
    assert route(svc, Request.build()).by == "default"
    svc = _svc(split={"key": {"header": "X-Uid"}, "weights": {"stable": 1, "canary": 99}, "whenKeyMissing": "random"})
    assert route(svc, Request.build()).by == "random"


def test_random_split_shares_match_weights() -> None:
    """Chi-square goodness of fit at p=0.001 on 20,000 draws (critical value 13.8 for 2 degrees of freedom)."""
    svc = _svc(servers={"a": ["h:1"], "b": ["h:2"], "c": ["h:3"]},
               split={"weights": {"a": 12.5, "b": 37.5, "c": 50}})
    rng = random.Random(7)
    n = 20000
    counts = collections.Counter(route(svc, Request.build(), lambda: rng.getrandbits(32)).upstream for _ in range(n))
    expected = {"a": 0.125 * n, "b": 0.375 * n, "c": 0.5 * n}
    chi2 = sum((counts[k] - e) ** 2 / e for k, e in expected.items())
    assert chi2 < 13.8, (counts, chi2)


def test_repeated_cookie_headers_are_joined_like_nginx() -> None:
    from grayagent.rules.model import Field
    req = Request.build(headers=[("Cookie", ""), ("cookie", "uid=2"), ("X-A", "first"), ("X-A", "second"),
                                 ("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "2.2.2.2")])
    assert field_value(Field("cookie", "uid"), req) == "2"
    assert field_value(Field("header", "x-forwarded-for"), req) == "1.1.1.1, 2.2.2.2"
    assert field_value(Field("header", "x-a"), req) == "first"


def test_route_refuses_a_source_ip_that_is_not_an_address(tmp_path: Path) -> None:
    """It was read as "no address" and answered with the default upstream, silently."""
    doc = tmp_path / "doc.json"
    doc.write_bytes(dump(document(service(rules=[{"name": "office", "match": {"sourceCIDRs": ["10.0.0.0/8"]},
                                                   "to": "canary"}]))))
    done = grayagent("route", "--file", str(doc), "--service", "product", "--source-ip", "10.1.2.3.4")
    assert done.returncode == 2 and done.stderr.strip() == "grayagent: --source-ip: '10.1.2.3.4' is not an IP address"
    assert grayagent("route", "--file", str(doc), "--service", "product", "--source-ip", "10.1.2.3").stdout.startswith(
        "upstream=canary")
