"""`grayagent route` and a real nginx make the same decision for every request.

10,000 seeded random requests cover every matcher kind, three upstreams, two-decimal weights, a zero weight,
and awkward keys (empty, unicode, 4 KB, quotes, whitespace). Then 10,000 random split keys on their own.
"""

from __future__ import annotations

import random
from pathlib import Path

from grayagent.rules.model import parse_document
from grayagent.rules.routing import Request, murmur2, route
from grayagent.stores.base import digest_of
from tests.agenthelp import nginx_target, wait_live
from tests.docs import document, dump, service
from tests.fidelity import AWKWARD, FidelityRequest, fidelity_document, requests, send_all
from tests.servers.proc import free_port


def _apply(nginx, doc: dict) -> None:
    content = dump(doc)
    target = nginx_target(nginx)
    release = parse_document(content, "fidelity")
    result = target.apply(target.render(release, 1, digest_of(content)), 1, digest_of(content))
    assert result.ok, result.error
    wait_live(nginx, 1)


def test_nginx_agrees_with_simulator_on_10000_requests(tmp_path: Path, nginx, backends) -> None:
    ports = {"svc-a": free_port(), "svc-b": free_port()}
    doc = fidelity_document({n: b.port for n, b in backends.items()}, ports["svc-a"], ports["svc-b"])
    _apply(nginx, doc)
    release = parse_document(dump(doc), "fidelity")
    reqs = requests(10_000)
    expected = [req.simulate(release) for req in reqs]
    got = send_all(reqs, ports)
    mismatches = [(r, e, g) for r, e, g in zip(reqs, expected, got, strict=True) if e.upstream != g]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]}"
    decided_by = {(e.by, e.rule) for e in expected}
    rules = {r.name for s in release.services for r in s.rules}
    # far-net is the negative CIDR case: every test client is on loopback, so it must never match.
    assert {name for by, name in decided_by if by == "rule"} == rules - {"far-net"}, "every rule must be exercised"
    assert {"split", "default"} <= {by for by, _ in decided_by}
    assert set(got) == {"stable", "canary", "beta"}


def test_nginx_split_agrees_on_random_and_awkward_keys(tmp_path: Path, nginx, backends) -> None:
    port = free_port()
    servers = {n: [f"127.0.0.1:{b.port}"] for n, b in backends.items()}
    doc = document(service(listen=f"127.0.0.1:{port}", servers=servers,
                           split={"key": {"header": "X-Key"}, "salt": "s",
                                  "weights": {"stable": 12.34, "canary": 0.01, "beta": 87.65}}))
    _apply(nginx, doc)
    svc = parse_document(dump(doc), "split").services[0]
    rng = random.Random(5)
    keys = [k for k in AWKWARD if k.strip() == k and k] + ["".join(chr(rng.randrange(0x21, 0x7F))
                                                               for _ in range(rng.randrange(1, 40)))
                                                           for _ in range(10_000)]
    reqs = [FidelityRequest("product", "/", [("X-Key", k)]) for k in keys]
    got = send_all(reqs, {"product": port})
    for key, answer in zip(keys, got, strict=True):
        assert answer == route(svc, Request.build(headers={"X-Key": key})).upstream, (key, murmur2(("s" + key).encode()))
    assert {"stable", "beta"} <= set(got)


def test_nginx_joins_repeated_cookie_and_forwarded_for_like_the_simulator(tmp_path: Path, nginx, backends) -> None:
    port = free_port()
    servers = {n: [f"127.0.0.1:{b.port}"] for n, b in backends.items()}
    doc = document(service(listen=f"127.0.0.1:{port}", servers=servers, rules=[
        {"name": "xff", "match": {"headers": {"X-Forwarded-For": {"exact": "1.1.1.1, 2.2.2.2"}}}, "to": "canary"},
        {"name": "second-cookie", "match": {"cookies": {"b": {"exact": "2"}}}, "to": "beta"}]))
    _apply(nginx, doc)
    svc = parse_document(dump(doc), "joined").services[0]
    cases = [[("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "2.2.2.2")], [("Cookie", "a=1"), ("Cookie", "b=2")],
             [("X-Forwarded-For", "1.1.1.1, 2.2.2.2")], [("X-Forwarded-For", "1.1.1.1")]]
    got = send_all([FidelityRequest("product", "/", h) for h in cases], {"product": port}, workers=1)
    assert got == [route(svc, Request.build(headers=h)).upstream for h in cases] == ["canary", "beta", "canary", "stable"]
