"""Sticky anonymous visitors (split.whenKeyMissing: cookie) mean the same in nginx reload mode, nginx dynamic
mode, Envoy and `grayagent route` (docs/routing-semantics.md §4).

One rule document, applied through each target's own apply. For every request the simulator says where it
goes and whether the answer sets the visitor cookie. A fresh ID is random, so for those the check is that the
proxy set exactly one well-formed cookie and served the upstream the simulator computes for THAT ID; every
request that carries an ID (or a key, or meets a rule) must land exactly where the simulator says, without
a cookie. Then: replaying a cookie sticks, a weight increase keeps the canary's visitors (monotone), rules
and keys never get a cookie, hostile cookie values are only ever replaced, and the upstream's own
Set-Cookie headers pass through.
"""

from __future__ import annotations

import random
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from grayagent.rules.model import Release, parse_document
from grayagent.rules.routing import Decision, Request, route
from grayagent.stores.base import digest_of
from grayagent.targets.base import Target
from grayagent.targets.lua_data import lua_string
from grayagent.targets.nginx_control import push_headers, read_token
from grayagent.targets.nginx_dynamic import NginxDynamicTarget
from grayagent.targets.nginx_dynamic_render import DATA_FILE, PUSH_PATH
from tests.agenthelp import dynamic_target, nginx_target, wait_live
from tests.docs import document, dump, service
from tests.envoyhelp import envoy_target, wait_target_live
from tests.fidelity import FidelityRequest, _Connection
from tests.servers.backends import Backend
from tests.servers.envoy import EnvoyInstance
from tests.servers.nginx import NginxInstance, lua_available
from tests.servers.proc import free_port

UPSTREAMS = ("stable", "canary", "beta")
SERVICES = ("svc-a", "svc-b")
COOKIE = {"svc-a": "ga_anon", "svc-b": "anon.id"}
MAX_AGE = {"svc-a": 7 * 86400, "svc-b": 3600}
SET_COOKIE = re.compile(r"(?P<name>[A-Za-z0-9._-]+)=(?P<id>[0-9a-f]{32}); Path=/; Max-Age=(?P<age>[0-9]+); "
                        r"HttpOnly; SameSite=Lax")


def anon_document(ports: dict[str, int], listen: dict[str, int], canary: float = 10) -> dict[str, Any]:
    """svc-a: rules, a header key, three parts, the default cookie name; svc-b: no key at all, the canary
    last (so a higher weight only adds visitors to it), a cookie name with a dot, a lifetime in seconds."""
    servers = {name: [f"127.0.0.1:{ports[name]}"] for name in UPSTREAMS}
    a = service("svc-a", listen=f"127.0.0.1:{listen['svc-a']}", servers=servers, rules=[
        {"name": "employee", "match": {"headers": {"X-Employee": {"exact": "true"}}}, "to": "canary"},
        {"name": "vip", "match": {"cookies": {"tier": {"exact": "vip"}}}, "to": "beta"},
    ], split={"key": {"header": "X-User-Id"}, "salt": "anon-a", "whenKeyMissing": "cookie",
              "weights": {"stable": 60, "canary": 25.5, "beta": 14.5},
              "anonymousCookie": {"maxAge": "7d"}})
    b = service("svc-b", listen=f"127.0.0.1:{listen['svc-b']}", servers=servers, default="beta", rules=[
        {"name": "internal", "match": {"path": {"prefix": "/internal/"}}, "to": "beta"},
    ], split={"weights": {"stable": 100 - canary, "canary": canary}, "whenKeyMissing": "cookie",
              "anonymousCookie": {"name": "anon.id", "maxAge": "3600s"}})
    return document(a, b, name="anon")


# ---------------------------------------------------------------------------------------------- proxies


@dataclass
class Gateway:
    """One proxy under test: its target, its listen ports, and how to wait until a version is live."""

    name: str
    target: Target
    listen: dict[str, int]
    wait: Any

    def apply(self, ports: dict[str, int], version: int, canary: float) -> None:
        content = dump(anon_document(ports, self.listen, canary))
        release = parse_document(content, self.name)
        result = self.target.apply(self.target.render(release, version, digest_of(content)), version,
                                   digest_of(content))
        assert result.ok, result.error
        self.wait(version)


@dataclass
class Lab:
    backends: dict[str, Backend]
    gateways: list[Gateway]
    release: Release | None = None  # what the gateways serve now
    version: int = 0

    @property
    def ports(self) -> dict[str, int]:
        return {name: b.port for name, b in self.backends.items()}

    def set_canary(self, canary: float) -> None:
        self.version += 1
        for gw in self.gateways:
            gw.apply(self.ports, self.version, canary)
        self.release = parse_document(dump(anon_document(self.ports, self.gateways[0].listen, canary)), "simulator")

    @property
    def served(self) -> Release:
        assert self.release is not None
        return self.release


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("anon")
    backends = {name: Backend(name).start() for name in UPSTREAMS}
    started: list[Any] = []
    try:
        nginx = NginxInstance(root / "nginx").start()
        started.append(nginx)
        gateways = [Gateway("nginx", nginx_target(nginx), {s: free_port() for s in SERVICES},
                            lambda v, n=nginx: wait_live(n, v))]
        if lua_available():
            dynamic = NginxInstance(root / "nginx-dynamic", lua=True).start()
            started.append(dynamic)
            gateways.append(Gateway("nginx-dynamic", dynamic_target(dynamic), {s: free_port() for s in SERVICES},
                                    lambda v: None))
        envoy = EnvoyInstance(root / "envoy").start()
        started.append(envoy)
        target = envoy_target(envoy)
        gateways.append(Gateway("envoy", target, {s: free_port() for s in SERVICES},
                                lambda v, t=target: wait_target_live(t, v)))
        lab = Lab(backends, gateways)
        lab.set_canary(10)
        yield lab
    finally:
        for proc in reversed(started):
            proc.stop()
        for b in backends.values():
            b.stop()


# ---------------------------------------------------------------------------------------------- requests


class Req(FidelityRequest):
    """A request of tests/fidelity.py, decided with the fresh ID the proxy drew."""

    def request(self) -> Request:
        path, _, query = self.path.partition("?")
        return Request.build(headers=self.headers, path=path, query=query, source_ip="127.0.0.1")

    def decide(self, release: Release, fresh: str | None = None) -> Decision:
        """The simulator's decision; `fresh` is the ID a proxy drew for this request, if it drew one."""
        return route(release.service(self.service), self.request(),
                     new_anonymous_id=(lambda: fresh) if fresh else (lambda: "f" * 32))

    def with_cookie(self, name: str, visitor: str) -> Req:
        return Req(self.service, self.path, [*self.headers, ("Cookie", f"{name}={visitor}")])


@dataclass
class Answer:
    status: int
    upstream: str
    cookies: list[str]  # the Set-Cookie header values, in order


def _answer(status: int, body: str, headers: list[tuple[str, str]]) -> Answer:
    return Answer(status, body, [v for k, v in headers if k.lower() == "set-cookie"])


def send(gw: Gateway, reqs: list[Req], workers: int = 4) -> list[Answer]:
    def run(chunk: list[tuple[int, Req]]) -> list[tuple[int, Answer]]:
        conns = {svc: _Connection(port) for svc, port in gw.listen.items()}
        out = [(i, _answer(*conns[r.service].exchange(r))) for i, r in chunk]
        for c in conns.values():
            c.conn.close()
        return out

    indexed = list(enumerate(reqs))
    answers: dict[int, Answer] = {}
    with ThreadPoolExecutor(workers) as pool:
        for part in pool.map(run, [indexed[w::workers] for w in range(workers)]):
            answers.update(part)
    return [answers[i] for i in range(len(reqs))]


def fresh_id(req: Req, answer: Answer) -> str | None:
    """The ID of the one anonymous cookie the gateway set, checked in every attribute; None when it set none."""
    ours = [c for c in answer.cookies if c.startswith(COOKIE[req.service] + "=")]
    if not ours:
        return None
    assert len(ours) == 1, f"{req}: more than one anonymous cookie: {ours}"
    found = SET_COOKIE.fullmatch(ours[0])
    assert found is not None, f"{req}: malformed Set-Cookie {ours[0]!r}"
    assert int(found["age"]) == MAX_AGE[req.service], ours[0]
    return found["id"]


def disagreement(release: Release, req: Req, answer: Answer) -> str | None:
    """Why a proxy's answer differs from the simulator's decision; None when they agree."""
    if answer.status != 200:
        return f"status {answer.status}"
    visitor = fresh_id(req, answer)
    decision = req.decide(release, visitor)
    if decision.set_cookie != (visitor is not None):
        return f"set_cookie: simulator {decision.set_cookie}, proxy {answer.cookies}"
    if decision.upstream != answer.upstream:
        return f"upstream: simulator {decision.upstream}, proxy {answer.upstream} (cookie {visitor})"
    return None


def _hex(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


def hostile_cookies(name: str, rng: random.Random) -> list[str]:
    """Cookie header values around one visitor cookie: malformed, foreign, repeated, padded, injected."""
    good, other = _hex(rng), _hex(rng)
    return [
        f"{name}=", f"{name}={good.upper()}", f"{name}={good}0", f"{name}={good[:-1]}", f'{name}="{good}"',
        f"{name}={good} ; x=1", f"{name}=$request_id", f"{name}=${{request_id}}", f"{name}=" + "a" * 4096,
        f"{name}=中文{good[6:]}", f"{name}=%30{good[3:]}", f"{name}={good};", f"{name}={good}\t",
        f"x{name}={good}", f"{name}x={good}", f" {name}={good}", f"a=1;{name}={good}", f"a=1; \t{name}={good}",
        f"{name}=bad; {name}={good}", f"{name}={good}; {name}=bad", f"{name}={good}; {name}={other}",
        f"{name} ={good}", f"{name}={good} Set-Cookie: evil=1", f'{name}={good}"; evil',
        f"{name}={'g' * 32}", f"{name}={good[:16]}-{good[17:]}", "tier=vip; " + f"{name}=bad",
        f"{name}=a" + " \t" * 2000 + "b", f"{name}=" + " " * 3000 + f"{good}\t \t", f"{name}={good}" + " " * 3000,
    ]


def corpus(n: int, seed: int = 20261202) -> list[Req]:
    rng = random.Random(seed)
    out: list[Req] = []
    for i in range(n):
        svc = SERVICES[i % 2]
        name = COOKIE[svc]
        roll = rng.random()
        if svc == "svc-a":
            req = Req(svc, "/" + rng.choice(["", "a", "internal/x"]))
            if roll < 0.2:
                req.headers.append(("X-User-Id", rng.choice([f"u{rng.getrandbits(40):x}", "", "\t"])))
            if rng.random() < 0.1:
                req.headers.append(("X-Employee", rng.choice(["true", "false"])))
            if rng.random() < 0.05:
                req.headers.append(("Cookie", rng.choice(["tier=vip", "tier=gold"])))
        else:
            req = Req(svc, rng.choice(["/", "/x", "/internal/", "/internal/a", "/internalx"]))
        roll = rng.random()
        if roll < 0.45:
            req.headers.append(("Cookie", f"{name}={_hex(rng)}"))
        elif roll < 0.7:
            req.headers.append(("Cookie", rng.choice(hostile_cookies(name, rng))))
        elif roll < 0.75:  # two Cookie headers: the proxies join them with "; "
            req.headers += [("Cookie", "a=1"), ("Cookie", f"{name}={_hex(rng)}")]
        out.append(req)
    return out


# ---------------------------------------------------------------------------------------------- tests


def test_every_gateway_routes_anonymous_visitors_as_the_simulator_says(lab: Lab) -> None:
    """(a), (d), (e): 4,000 requests with IDs, without, hostile, keyed and rule-decided, through each proxy."""
    assert [g.name for g in lab.gateways] == ["nginx", *(["nginx-dynamic"] if lua_available() else []), "envoy"]
    reqs = corpus(4000)
    decisions = [r.decide(lab.served) for r in reqs]
    by = {(d.by, d.set_cookie) for d in decisions}
    assert {("rule", False), ("split", False), ("random", True)} <= by, by
    assert sum(d.set_cookie for d in decisions) > 400 and sum(not d.set_cookie for d in decisions) > 2000
    for gw in lab.gateways:
        answers = send(gw, reqs)
        wrong = [(r, why) for r, a in zip(reqs, answers, strict=True)
                 if (why := disagreement(lab.served, r, a)) is not None]
        assert not wrong, f"{gw.name}: {len(wrong)} of {len(reqs)} disagree; first: {wrong[:3]}"
        # (d): a rule or a key decided -> no cookie, whatever cookie the request carried.
        for r, d, a in zip(reqs, decisions, answers, strict=True):
            if d.by == "rule" or (d.by == "split" and r.service == "svc-a" and r.request().headers.get("x-user-id")):
                assert not a.cookies, (gw.name, r, a)


def test_a_fresh_cookie_is_well_formed_and_sticks(lab: Lab) -> None:
    """(b): one Set-Cookie with the right attributes; 20 replays land where the simulator puts that ID."""
    for gw in lab.gateways:
        for svc in SERVICES:
            first = Req(svc, "/")
            answer = send(gw, [first])[0]
            assert len(answer.cookies) == 1, (gw.name, answer.cookies)
            visitor = fresh_id(first, answer)
            assert visitor is not None, (gw.name, answer.cookies)
            expected = first.with_cookie(COOKIE[svc], visitor).decide(lab.served)
            assert expected.by == "split" and not expected.set_cookie
            replays = send(gw, [first.with_cookie(COOKIE[svc], visitor)] * 20, workers=2)
            assert {(a.upstream, tuple(a.cookies)) for a in replays} == {(expected.upstream, ())}, gw.name
            assert answer.upstream == expected.upstream, gw.name


def test_ids_are_distinct_and_spread_like_the_weights(lab: Lab) -> None:
    """Fresh IDs are random (no two alike across workers), and the visitors they make split by the weights."""
    for gw in lab.gateways:
        answers = send(gw, [Req("svc-a", "/")] * 1000)
        ids = [fresh_id(Req("svc-a"), a) for a in answers]
        assert None not in ids and len(set(ids)) == 1000, gw.name
        share = sum(a.upstream == "stable" for a in answers) / 1000
        assert 0.5 < share < 0.7, (gw.name, share)  # 60 % (binomial sd 1.5 %)


def test_the_upstreams_own_set_cookie_headers_are_kept(lab: Lab) -> None:
    for b in lab.backends.values():
        b.extra_headers = [("Set-Cookie", "app=1; Path=/"), ("Set-Cookie", "theme=dark")]
    try:
        for gw in lab.gateways:
            answer = send(gw, [Req("svc-a", "/")])[0]
            apps = [c for c in answer.cookies if not c.startswith("ga_anon=")]
            assert apps == ["app=1; Path=/", "theme=dark"], (gw.name, answer.cookies)
            assert len(answer.cookies) == 3 and fresh_id(Req("svc-a"), answer) is not None, gw.name
            keyed = send(gw, [Req("svc-a", "/", [("X-User-Id", "u1")])])[0]
            assert keyed.cookies == ["app=1; Path=/", "theme=dark"], (gw.name, keyed.cookies)
    finally:
        for b in lab.backends.values():
            b.extra_headers = []


def test_a_weight_increase_keeps_the_canarys_visitors(lab: Lab) -> None:
    """(c): 2,000 visitors get their cookies at 10 % canary; at 30 % and 50 % every canary visitor stays."""
    gw_visitors: dict[str, list[tuple[str, str]]] = {}
    for gw in lab.gateways:
        answers = send(gw, [Req("svc-b", "/")] * 2000)
        gw_visitors[gw.name] = [(fresh_id(Req("svc-b"), a) or "", a.upstream) for a in answers]
    try:
        for canary in (30, 50):
            lab.set_canary(canary)
            for gw in lab.gateways:
                visitors = gw_visitors[gw.name]
                replays = [Req("svc-b", "/").with_cookie("anon.id", v) for v, _ in visitors]
                answers = send(gw, replays)
                wrong = [(r, why) for r, a in zip(replays, answers, strict=True)
                         if (why := disagreement(lab.served, r, a)) is not None]
                assert not wrong, f"{gw.name} at {canary}%: {wrong[:3]}"
                left = [v for (v, before), a in zip(visitors, answers, strict=True)
                        if before == "canary" and a.upstream != "canary"]
                assert not left, f"{gw.name}: {len(left)} canary visitors moved back at {canary}%"
                on_canary = sum(a.upstream == "canary" for a in answers) / len(answers)
                assert canary / 100 - 0.05 < on_canary < canary / 100 + 0.05, (gw.name, canary, on_canary)
                gw_visitors[gw.name] = [(v, a.upstream) for (v, _), a in zip(visitors, answers, strict=True)]
    finally:
        lab.set_canary(10)


def test_rule_and_key_never_set_the_cookie_even_without_one(lab: Lab) -> None:
    """(d) spelled out: no key and no cookie, but a rule decides -> no cookie; a key decides -> no cookie."""
    reqs = [Req("svc-a", "/", [("X-Employee", "true")]), Req("svc-a", "/", [("Cookie", "tier=vip")]),
            Req("svc-b", "/internal/x"), Req("svc-a", "/", [("X-User-Id", "someone")])]
    for gw in lab.gateways:
        answers = send(gw, reqs, workers=1)
        assert [a.cookies for a in answers] == [[]] * 4, gw.name
        assert [a.upstream for a in answers] == [r.decide(lab.served).upstream for r in reqs], gw.name


def test_an_answer_the_proxy_makes_itself_sets_the_cookie_too(lab: Lab) -> None:
    """With every upstream down, nginx answers 502 and Envoy 503 themselves; the visitor still gets an ID,
    as for any answer to a request the anonymous path decided, and a rule's request still gets none."""
    ports = lab.ports
    for b in lab.backends.values():
        b.stop()
    try:
        for gw in lab.gateways:
            anonymous, ruled = send(gw, [Req("svc-a", "/"), Req("svc-a", "/", [("X-Employee", "true")])], workers=1)
            assert anonymous.status in (502, 503) and fresh_id(Req("svc-a"), anonymous) is not None, gw.name
            assert ruled.status in (502, 503) and ruled.cookies == [], gw.name
    finally:
        for name in UPSTREAMS:
            lab.backends[name] = Backend(name, ports[name]).start()


def test_dynamic_mode_refuses_pushed_cookie_text_that_could_split_a_header(lab: Lab) -> None:
    """The agent renders the cookie's name and attributes from a checked document; a push carrying anything
    else (CR LF, a second header, an index out of range) is refused whole, and routing goes on."""
    gw = next((g for g in lab.gateways if g.name == "nginx-dynamic"), None)
    if gw is None:
        pytest.skip("lua-nginx-module is not installed")
    assert isinstance(gw.target, NginxDynamicTarget)
    token = read_token(gw.target.token_path)
    assert token is not None
    content = dump(anon_document(lab.ports, gw.listen, 10))
    release = parse_document(content, "t")
    data = gw.target.render(release, 99, digest_of(content))[DATA_FILE].decode()
    attributes = lua_string("; Path=/; Max-Age=604800; HttpOnly; SameSite=Lax")
    assert attributes in data
    url = f"http://{gw.target.settings.control_listen}{PUSH_PATH}"
    for bad in (data.replace(attributes, lua_string("; Path=/\r\nX-Evil: 1")),
                data.replace(lua_string("ga_anon"), lua_string("ga anon=1;")),
                re.sub(r'\["input"\] = [0-9]+', '["input"] = 50', data, count=1)):
        assert bad != data
        body = bad.encode()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST",
                                                          headers=push_headers(token, 0, body)), timeout=5)
        assert refused.value.code == 400 and b"anonymous cookie" in refused.value.read()
    assert send(gw, [Req("svc-a", "/", [("X-Employee", "true")])])[0].upstream == "canary"
