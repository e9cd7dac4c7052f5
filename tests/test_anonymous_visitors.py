"""Sticky anonymous visitors (split.whenKeyMissing: cookie): validation, the simulator's meaning, the CLI, and
what the renderers write. The proxies' agreement is in test_fidelity_anon.py."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from grayagent.errors import InvalidDocument
from grayagent.rules.model import Release, parse_document
from grayagent.rules.routing import Decision, Request, murmur2, route
from grayagent.targets.envoy_render import render as envoy_render
from grayagent.targets.nginx_dynamic_render import DynamicOptions, service_data
from grayagent.targets.nginx_render import render as nginx_render
from tests.agenthelp import grayagent
from tests.docs import document, dump, service

ID = "0123456789abcdef0123456789abcdef"
SERVERS = {"stable": ["127.0.0.1:9001"], "canary": ["127.0.0.1:9002"]}


def _split(**extra: Any) -> dict[str, Any]:
    return {"key": {"header": "X-User-Id"}, "salt": "s", "weights": {"stable": 90, "canary": 10},
            "whenKeyMissing": "cookie", **extra}


def _release(split: dict[str, Any], **extra: Any) -> Release:
    return parse_document(dump(document(service(servers=SERVERS, split=split, **extra))), "t.yaml")


def _problems(split: dict[str, Any]) -> list[str]:
    with pytest.raises(InvalidDocument) as refused:
        _release(split)
    return [str(p) for p in refused.value.problems]


# ---------------------------------------------------------------------------------------------- validation


def test_defaults_and_given_values() -> None:
    cookie = _release(_split()).services[0].split.anonymous_cookie  # type: ignore[union-attr]
    assert cookie is not None and (cookie.name, cookie.max_age) == ("ga_anon", 30 * 86400)
    for age, seconds in (("1s", 1), ("90m", 5400), ("12h", 43200), ("400d", 400 * 86400), ("34560000s", 34560000)):
        split = _split(anonymousCookie={"name": "v.id-2_x", "maxAge": age})
        cookie = _release(split).services[0].split.anonymous_cookie  # type: ignore[union-attr]
        assert cookie is not None and (cookie.name, cookie.max_age) == ("v.id-2_x", seconds)
    assert _release(_split(whenKeyMissing="random")).services[0].split.anonymous_cookie is None  # type: ignore[union-attr]
    keyless = _release({"weights": {"stable": 50, "canary": 50}, "whenKeyMissing": "cookie"}).services[0].split
    assert keyless is not None and keyless.key is None and keyless.anonymous_cookie is not None


@pytest.mark.parametrize(("split", "field", "says"), [
    (_split(anonymousCookie={"maxAge": "0s"}), "anonymousCookie.maxAge", "outside 1s to 400d"),
    (_split(anonymousCookie={"maxAge": "401d"}), "anonymousCookie.maxAge", "400 days"),
    (_split(anonymousCookie={"maxAge": "34560001s"}), "anonymousCookie.maxAge", "outside"),
    (_split(anonymousCookie={"maxAge": "30"}), "anonymousCookie.maxAge", "does not match"),
    (_split(anonymousCookie={"maxAge": "1.5d"}), "anonymousCookie.maxAge", "does not match"),
    (_split(anonymousCookie={"maxAge": "2w"}), "anonymousCookie.maxAge", "does not match"),
    (_split(anonymousCookie={"maxAge": 3600}), "anonymousCookie.maxAge", "not of type"),
    (_split(anonymousCookie={"name": "a;b"}), "anonymousCookie.name", "does not match"),
    (_split(anonymousCookie={"name": "$request_id"}), "anonymousCookie.name", "does not match"),
    (_split(anonymousCookie={"name": ""}), "anonymousCookie.name", "does not match"),
    (_split(anonymousCookie={"name": "x" * 129}), "anonymousCookie.name", "does not match"),
    (_split(anonymousCookie={"path": "/"}), "anonymousCookie", "unknown field"),
    (_split(key={"cookie": "ga_anon"}), "anonymousCookie.name", "split key's own cookie"),
    (_split(key={"cookie": "sid"}, anonymousCookie={"name": "sid"}), "anonymousCookie.name", "own cookie"),
    (_split(whenKeyMissing="default", anonymousCookie={}), "anonymousCookie", "only used with whenKeyMissing"),
    (_split(whenKeyMissing="Cookie"), "whenKeyMissing", "is not one of"),
])
def test_bad_anonymous_settings_are_one_line_each(split: dict[str, Any], field: str, says: str) -> None:
    problems = _problems(split)
    assert len(problems) == 1 and problems[0].startswith(f"t.yaml: spec.services[0].split.{field}:"), problems
    assert says in problems[0] and "\n" not in problems[0]


def test_validate_cli_names_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(dump(document(service(servers=SERVERS, split=_split(anonymousCookie={"maxAge": "500d"})))))
    result = grayagent("validate", str(bad))
    assert result.returncode != 0
    assert result.stderr.strip() == (f"{bad}: spec.services[0].split.anonymousCookie.maxAge: 500d is outside 1s to "
                                     "400d (browsers cap Max-Age at 400 days)")


# ---------------------------------------------------------------------------------------------- meaning


def _route(release: Release, fresh: str = "f" * 32, **parts: Any) -> Decision:
    return route(release.services[0], Request.build(**parts), new_anonymous_id=lambda: fresh)


def test_the_simulator_hashes_the_id_and_sets_a_cookie_only_for_a_fresh_one() -> None:
    release = _release(_split(), rules=[{"name": "emp", "match": {"headers": {"X-Emp": {"exact": "1"}}},
                                         "to": "canary"}])
    assert _route(release, headers={"X-Emp": "1"}) == Decision("canary", "emp", "rule")
    keyed = _route(release, headers={"X-User-Id": "u1"})
    assert (keyed.by, keyed.bucket, keyed.set_cookie) == ("split", murmur2(b"su1"), False)
    visitor = _route(release, cookies={"ga_anon": ID})
    assert (visitor.by, visitor.bucket, visitor.set_cookie) == ("split", murmur2(b"s" + ID.encode()), False)
    fresh = _route(release, fresh="a" * 32)
    assert (fresh.by, fresh.bucket, fresh.set_cookie) == ("random", murmur2(b"s" + b"a" * 32), True)
    assert fresh.as_dict()["set_cookie"] is True and "set_cookie" not in visitor.as_dict()
    # The key wins over the cookie; an empty key counts as absent (docs/routing-semantics.md §1).
    assert _route(release, headers={"X-User-Id": "u1"}, cookies={"ga_anon": ID}) == keyed
    assert _route(release, headers={"X-User-Id": " \t"}, cookies={"ga_anon": ID}) == visitor


@pytest.mark.parametrize(("cookie", "uses_id"), [
    (f"ga_anon={ID}", True), (f"ga_anon= {ID}\t", True), (f"a=1;\tga_anon={ID}; b=2", True),
    (f"ga_anon={ID}; ga_anon=bad", True), (f"ga_anon=bad; ga_anon={ID}", False), (f"ga_anon={ID.upper()}", False),
    (f"ga_anon={ID}0", False), (f"ga_anon={ID[:-1]}", False), (f'ga_anon="{ID}"', False), ("ga_anon=", False),
    (f"xga_anon={ID}", False), (f"ga_anon ={ID}", False), (f"GA_ANON={ID}", False), (f"ga_anon={'g' * 32}", False),
])
def test_only_a_well_formed_first_cookie_is_an_id(cookie: str, uses_id: bool) -> None:
    decision = _route(_release(_split()), fresh="e" * 32, headers={"Cookie": cookie})
    assert decision.set_cookie is not uses_id
    assert decision.bucket == murmur2(b"s" + (ID if uses_id else "e" * 32).encode())


def test_a_rising_canary_keeps_its_visitors() -> None:
    """10,000 visitors: at 10, 30, 50 and 100 % every canary visitor stays on the canary, for two and three
    upstreams (the third keeps its share; the canary is listed between the others)."""
    rng = random.Random(15)
    ids = [f"{rng.getrandbits(128):032x}" for _ in range(10_000)]
    servers = {**SERVERS, "beta": ["127.0.0.1:9003"]}
    for order in (("stable", "canary"), ("stable", "canary", "beta"), ("canary", "stable")):
        before: set[str] = set()
        for canary in (10, 30, 50, 100):
            weights = {"stable": 100 - canary - (5 if "beta" in order and canary < 100 else 0), "canary": canary,
                       "beta": 5 if canary < 100 else 0}
            split = {"weights": {u: weights[u] for u in order}, "whenKeyMissing": "cookie"}
            svc = parse_document(dump(document(service(servers=servers, split=split))), "t").services[0]
            on = {i for i in ids if route(svc, Request.build(cookies={"ga_anon": i})).upstream == "canary"}
            assert before <= on, (order, canary, len(before - on))
            assert abs(len(on) / len(ids) - canary / 100) < 0.02, (order, canary, len(on))
            before = on


def test_route_cli_reports_the_cookie(tmp_path: Path) -> None:
    doc = tmp_path / "rules.yaml"
    doc.write_bytes(dump(document(service(servers=SERVERS, split=_split()))))
    fresh = grayagent("route", "--file", str(doc), "--service", "product")
    assert fresh.returncode == 0 and fresh.stdout.strip().endswith("by=random set_cookie=yes"), fresh
    known = grayagent("route", "--file", str(doc), "--service", "product", "--cookie", f"ga_anon={ID}", "-o", "json")
    assert json.loads(known.stdout) == {"upstream": route(_release(_split()).services[0], Request.build(
        cookies={"ga_anon": ID})).upstream, "rule": None, "by": "split", "bucket": murmur2(b"s" + ID.encode())}
    lines = tmp_path / "requests.jsonl"
    lines.write_text(json.dumps({"service": "product"}) + "\n"
                     + json.dumps({"service": "product", "cookies": {"ga_anon": ID}}) + "\n")
    batch = [json.loads(line) for line in grayagent("route", "--file", str(doc), "--requests", str(lines))
             .stdout.splitlines()]
    assert [b.get("set_cookie", False) for b in batch] == [True, False]


# ---------------------------------------------------------------------------------------------- renderers


def test_nginx_sets_the_cookie_only_where_a_service_asks() -> None:
    plain = service("plain", listen=18090, servers=SERVERS, split={"key": {"header": "X-User-Id"},
                                                                   "weights": {"stable": 90, "canary": 10}})
    anon = service("anon", listen=18091, servers=SERVERS, split=_split())
    out = nginx_render(parse_document(dump(document(plain, anon)), "t"), 1, "d")
    assert out.count("add_header Set-Cookie") == 1 and "$ga_s0_" not in out.split("add_header")[1].split("\n")[0]
    assert '"ga_anon=$request_id; Path=/; Max-Age=2592000; HttpOnly; SameSite=Lax"' in out
    assert 'split_clients "s${ga_s1_aid}" $ga_s1_asplit' in out


def test_lua_data_carries_the_cookie_and_its_input() -> None:
    svc = _release(_split(anonymousCookie={"name": "v.id", "maxAge": "1h"})).services[0]
    data = service_data(svc)
    anon = data["split"]["anon"]
    assert anon == {"name": "v.id", "attributes": "; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax",
                    "input": data["inputs"].index(["cookie", "v.id"]) + 1}
    assert DynamicOptions(lua_dir="/x")  # the options need nothing new
    files = envoy_render(_release(_split()), 1, "sha256:" + "0" * 64)
    rds = next(v for k, v in files.items() if k.startswith("rds/")).decode()
    assert "envoy_on_response" in rds and "Max-Age=2592000" not in rds  # the attributes are \ddd-escaped
