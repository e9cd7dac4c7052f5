"""nginx (reload mode), nginx (dynamic mode), Envoy and `grayagent route` make the same decision for every request.

The proxies are configured through their target's apply, from one rule document: the copies differ only
in the listen ports (all run on this host). nginx dynamic mode joins when lua-nginx-module is installed
(`make test` installs it); without it this stays three-way. 10,000 seeded requests (tests/fidelity.py) cover
every matcher kind, three upstreams, two-decimal weights, a zero weight and awkward keys (empty, unicode,
4 KB, quotes, whitespace); 600 more cover server names, the 404 for unknown hosts, a rule on Host and a
one-part split without its key. Envoy merges repeated built-in headers, so no request repeats one.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest

from grayagent.rules.model import parse_document
from grayagent.stores.base import digest_of
from grayagent.targets.base import Target
from tests.agenthelp import dynamic_target, nginx_target, wait_live
from tests.docs import dump
from tests.envoyhelp import envoy_instance, envoy_target, wait_target_live
from tests.fidelity import expected_answer, fidelity_document, host_requests, hosts_service, requests, send_all
from tests.servers.envoy import EnvoyInstance
from tests.servers.nginx import NginxInstance, lua_available
from tests.servers.proc import free_port


@pytest.fixture
def envoy(tmp_path: Path) -> Iterator[EnvoyInstance]:
    yield from envoy_instance(tmp_path)


def _document(backend_ports: dict[str, int], listen: dict[str, int]) -> dict:
    doc = fidelity_document(backend_ports, listen["svc-a"], listen["svc-b"])
    doc["spec"]["services"].append(hosts_service(backend_ports, listen["svc-c"]))
    return doc


def _apply(target: Target, doc: dict) -> None:
    content = dump(doc)
    release = parse_document(content, target.name)
    result = target.apply(target.render(release, 1, digest_of(content)), 1, digest_of(content))
    assert result.ok, result.error


def _with_ports(doc: dict, listen: dict[str, int]) -> dict:
    out = copy.deepcopy(doc)
    for svc in out["spec"]["services"]:
        svc["listen"] = f"127.0.0.1:{listen[svc['name']]}"
    return out


@pytest.fixture
def lua_nginx(tmp_path: Path) -> Iterator[NginxInstance | None]:
    if not lua_available():
        yield None
        return
    instance = NginxInstance(tmp_path / "nginx-dynamic", lua=True).start()
    yield instance
    instance.stop()


def test_nginx_envoy_and_simulator_agree_on_every_request(nginx, lua_nginx, envoy, backends) -> None:
    backend_ports = {n: b.port for n, b in backends.items()}
    nginx_ports = {name: free_port() for name in ("svc-a", "svc-b", "svc-c")}
    envoy_ports = {name: free_port() for name in ("svc-a", "svc-b", "svc-c")}
    dynamic_ports = {name: free_port() for name in ("svc-a", "svc-b", "svc-c")}
    doc = _document(backend_ports, nginx_ports)
    envoy_doc = _with_ports(doc, envoy_ports)
    assert _with_ports(envoy_doc, nginx_ports) == doc, "one document; only the listen ports differ"

    _apply(nginx_target(nginx), doc)
    wait_live(nginx, 1)
    target = envoy_target(envoy)
    _apply(target, envoy_doc)
    wait_target_live(target, 1)
    if lua_nginx is not None:
        _apply(dynamic_target(lua_nginx), _with_ports(doc, dynamic_ports))

    release = parse_document(dump(doc), "fidelity")
    reqs = requests(10_000) + host_requests(600)
    assert len([r for r in reqs if r.service != "svc-c"]) >= 10_000
    expected = [expected_answer(release, r) for r in reqs]
    via_nginx = send_all(reqs, nginx_ports)
    via_envoy = send_all(reqs, envoy_ports)
    via_dynamic = send_all(reqs, dynamic_ports) if lua_nginx is not None else via_nginx

    disagree = [(r, e, n, d, v) for r, e, n, d, v in zip(reqs, expected, via_nginx, via_dynamic, via_envoy,
                                                         strict=True)
                if not e == n == d == v]
    assert not disagree, (f"{len(disagree)} of {len(reqs)} disagree (request, simulator, nginx reload, nginx "
                          f"dynamic, envoy); first: {disagree[:3]}")
    if lua_nginx is not None:
        assert lua_nginx.reloads() == 1, "dynamic mode: one reload for the first skeleton, none after"

    # The corpus must really exercise everything it claims to.
    decisions = [r.simulate(release) for r in reqs if expected_answer(release, r) != "404"]
    rules = {r.name for s in release.services for r in s.rules}
    # far-net is the negative CIDR case: every test client is on loopback, so it must never match.
    assert {d.rule for d in decisions if d.by == "rule"} == rules - {"far-net"}
    assert {"split", "default"} <= {d.by for d in decisions}
    assert set(expected) == {"stable", "canary", "beta", "404"}
