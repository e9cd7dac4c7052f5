"""A rule document that uses every matcher kind, and a seeded stream of requests that exercise it.

Every target's fidelity test sends the same requests through the real proxy and compares each answer
with grayagent.rules.routing. Path and query stay printable ASCII (what a client puts on a request line);
header and cookie values include unicode, quotes, 4 KB strings and empty values.
"""

from __future__ import annotations

import http.client
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from grayagent.rules.model import Release
from grayagent.rules.routing import Decision, Request, route
from tests.docs import document, service

UPSTREAMS = ("stable", "canary", "beta")
# Optional whitespace around a header value (RFC 9110): spaces and tabs, leading, trailing, mixed, alone.
# Every target must strip it as docs/routing-semantics.md §1 says; a value of only whitespace is absent.
OWS = ["\tlead-tab", "trail-tab\t", " \t mixed \t", "\t", " \t ", "\t\t", " lead-space"]

AWKWARD = ["", "é", "中文键", "😀", "a" * 4096, '"quoted"', "'single'", "back\\slash", "$host", "{brace}",
           "x" * 37, "0", " ", "%00", "tab\tinside", "ümlaut-ä", "end ", *OWS]


def fidelity_document(ports: dict[str, int], listen_a: int, listen_b: int) -> dict[str, Any]:
    servers = {name: [f"127.0.0.1:{ports[name]}"] for name in UPSTREAMS}
    a = service("svc-a", listen=f"127.0.0.1:{listen_a}", servers=servers, rules=[
        {"name": "tester", "match": {"headers": {"X-Employee": {"exact": "true"}}}, "to": "canary"},
        {"name": "tags", "match": {"headers": {"X-User-Tag": {"in": ["vip", "beta", "中文"]}}}, "to": "beta"},
        {"name": "region", "match": {"headers": {"X-Region": {"regex": "^(bj|sh)[0-9]*$"}}}, "to": "canary"},
        {"name": "ua", "match": {"headers": {"User-Agent": {"regex": "(?i)iphone"}},
                                 "cookies": {"beta": {"exact": "1"}}}, "to": "beta"},
        {"name": "prefix", "match": {"headers": {"X-Build": {"prefix": "2024."}}}, "to": "canary"},
        {"name": "absent", "match": {"headers": {"X-Probe": {"present": True}, "X-Skip": {"present": False}}},
         "to": "beta"},
        {"name": "far-net", "match": {"sourceCIDRs": ["10.0.0.0/8"], "headers": {"X-Net": {"present": True}}},
         "to": "canary"},
        {"name": "loopback", "match": {"sourceCIDRs": ["127.0.0.1/32", "::1/128"],
                                       "headers": {"X-Net": {"exact": "local"}}}, "to": "beta"},
    ], split={"key": {"header": "X-User-Id"}, "salt": "fid-a", "weights": {"stable": 47.25, "canary": 31.5,
                                                                             "beta": 21.25}})
    b = service("svc-b", listen=f"127.0.0.1:{listen_b}", servers=servers, default="canary", rules=[
        {"name": "api", "match": {"path": {"prefix": "/api/v2/"}, "query": {"debug": {"present": True}}}, "to": "beta"},
        {"name": "path-rx", "match": {"path": {"regex": "^/items/[0-9]+$"}}, "to": "stable"},
        {"name": "q-in", "match": {"query": {"ab": {"in": ["x", "y-1"]}}}, "to": "beta"},
        {"name": "cookie-prefix", "match": {"cookies": {"exp.group": {"prefix": "g"}}}, "to": "stable"},
    ], split={"key": {"cookie": "uid"}, "salt": "", "weights": {"beta": 66.67, "canary": 0, "stable": 33.33}})
    return document(a, b, name="fidelity")


@dataclass
class FidelityRequest:
    service: str
    path: str = "/"
    headers: list[tuple[str, str]] = field(default_factory=list)

    def simulate(self, release: Release, source_ip: str = "127.0.0.1") -> Decision:
        """What grayagent.rules.routing decides for this request (the proxies' peer is loopback)."""
        path, _, query = self.path.partition("?")
        request = Request.build(headers=self.headers, path=path, query=query, source_ip=source_ip)
        return route(release.service(self.service), request)


class _Connection:
    """One keep-alive connection; a request that names a Host header sends that one instead of http.client's."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def get(self, req: FidelityRequest) -> tuple[int, str]:
        status, body, _ = self.exchange(req)
        return status, body

    def exchange(self, req: FidelityRequest) -> tuple[int, str, list[tuple[str, str]]]:
        """Status, body and the response's headers (repeats kept, in order)."""
        for attempt in range(2):
            try:
                own_host = any(k.lower() == "host" for k, _ in req.headers)
                self.conn.putrequest("GET", req.path, skip_host=own_host, skip_accept_encoding=True)
                for k, v in req.headers:
                    self.conn.putheader(k, v.encode("utf-8"))
                self.conn.endheaders()
                resp = self.conn.getresponse()
                return resp.status, resp.read().decode("utf-8", "replace"), resp.getheaders()
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                if attempt:
                    raise
        raise AssertionError("unreachable")


def send_all(reqs: list[FidelityRequest], ports: dict[str, int], workers: int = 4) -> list[str]:
    """Each request's answer through the proxy: the backend's name, or the status code when it is not 200."""

    def run(chunk: list[tuple[int, FidelityRequest]]) -> list[tuple[int, str]]:
        conns = {svc: _Connection(port) for svc, port in ports.items()}
        out = []
        for i, req in chunk:
            status, body = conns[req.service].get(req)
            out.append((i, body if status == 200 else str(status)))
        for c in conns.values():
            c.conn.close()
        return out

    indexed = list(enumerate(reqs))
    chunks = [indexed[w::workers] for w in range(workers)]
    answers: dict[int, str] = {}
    with ThreadPoolExecutor(workers) as pool:
        for part in pool.map(run, chunks):
            answers.update(part)
    return [answers[i] for i in range(len(reqs))]


def _pick(rng: random.Random, *options: Any) -> Any:
    return options[rng.randrange(len(options))]


def requests(n: int, seed: int = 20261126) -> list[FidelityRequest]:
    rng = random.Random(seed)
    out: list[FidelityRequest] = []
    for i in range(n):
        key = rng.choice(AWKWARD) if i % 10 == 0 else f"u{rng.getrandbits(48):x}"
        if rng.random() < 0.5:
            req = FidelityRequest("svc-a", "/" + rng.choice(["", "x", "items/1"]))
            req.headers.append(("X-User-Id", key))
            if rng.random() < 0.1:
                req.headers.append(("X-Employee", _pick(rng, "true", "True", "true ", "false", "", "\ttrue",
                                                        "true\t", " \ttrue\t ", "\t", "tr\tue")))
            if rng.random() < 0.1:
                req.headers.append(("X-User-Tag", _pick(rng, "vip", "VIP", "beta", "中文", "vip2", "", "\tvip",
                                                        "beta\t", " \t")))
            if rng.random() < 0.1:
                req.headers.append(("X-Region", _pick(rng, "bj", "sh12", "gz", "bj-1", "SH", "")))
            if rng.random() < 0.1:
                req.headers.append(("User-Agent", _pick(rng, "Mozilla iPhone", "IPHONE", "android")))
                req.headers.append(("Cookie", _pick(rng, "beta=1", "beta=10", "xbeta=1", "a=2; beta=1")))
            if rng.random() < 0.05:
                req.headers.append(("X-Build", _pick(rng, "2024.1", "2024", "2023.9", "\t2024.1", " \t2024.")))
            if rng.random() < 0.05:
                req.headers.append(("X-Probe", _pick(rng, "1", "", "\t", " \t ")))
                if rng.random() < 0.5:
                    req.headers.append(("X-Skip", _pick(rng, "1", "")))
            if rng.random() < 0.05:
                req.headers.append(("X-Net", _pick(rng, "local", "remote")))
            if rng.random() < 0.02:
                req.headers.append(("X-User-Id", "second-value-is-ignored"))
        else:
            path = _pick(rng, "/", "/api/v2/x", "/api/v2", "/items/42", "/items/42/", "/items/x", "/a%20b")
            query = _pick(rng, "", "debug=1", "debug=", "a=1&debug=yes", "ab=x", "ab=y-1", "ab=y", "xab=x",
                          "ab=x&ab=y")
            req = FidelityRequest("svc-b", path + ("?" + query if query else ""))
            cookie_key = key if all(c not in key for c in ";\t") and key.strip() == key else f"u{i}"
            cookies = [f"uid={cookie_key}"]
            if rng.random() < 0.15:
                cookies.insert(rng.randrange(2), _pick(rng, "exp.group=g1", "exp.group=h", "exp_group=g", "xuid=9"))
            if rng.random() < 0.1:  # two Cookie headers: nginx joins them
                req.headers.extend(("Cookie", c) for c in cookies)
            else:
                req.headers.append(("Cookie", "; ".join(cookies) if rng.random() < 0.95 else ""))
        out.append(req)
    return out


# ---------------------------------------------------------------------------------------------- hosts
# A third service: server names, a 404 for unknown hosts, rules on the Host and Cookie headers themselves,
# and a one-part split whose missing key still means the default upstream.

HOSTS = ["c.example.com", "*.c.example.org"]
HOST_VALUES = ["c.example.com", "C.Example.COM", "c.example.com:8080", "c.example.com.", "www.c.example.org",
               "www.c.example.org:81", "a.b.c.example.org", "WWW.c.example.org", "c.example.org", "other.example",
               "xc.example.com", "c.example.com.evil"]


def hosts_service(ports: dict[str, int], listen: int) -> dict[str, Any]:
    servers = {name: [f"127.0.0.1:{ports[name]}"] for name in UPSTREAMS}
    return service("svc-c", listen=f"127.0.0.1:{listen}", servers=servers, hosts=HOSTS, rules=[
        {"name": "www", "match": {"headers": {"Host": {"regex": "^www\\."}}}, "to": "beta"},
        {"name": "cookie-header", "match": {"headers": {"Cookie": {"regex": "; exp=1$"}}}, "to": "beta"},
    ], split={"key": {"cookie": "uid"}, "weights": {"stable": 0, "canary": 100, "beta": 0}})


def host_served(host: str) -> bool:
    """nginx's server_name match for HOSTS: case-insensitive, port and one trailing dot ignored."""
    name = host.lower().rsplit(":", 1)[0] if ":" in host else host.lower()
    name = name.removesuffix(".")
    return name == "c.example.com" or (name.endswith(".c.example.org") and len(name) > len(".c.example.org"))


def host_requests(n: int, seed: int = 7) -> list[FidelityRequest]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        headers = [("Host", HOST_VALUES[i % len(HOST_VALUES)])]
        if rng.random() < 0.5:
            headers.append(("Cookie", f"uid=u{rng.getrandbits(32):x}"))
        if rng.random() < 0.3:  # a second Cookie header: the Cookie header's value is both joined
            headers.append(("Cookie", "exp=1"))
        out.append(FidelityRequest("svc-c", "/", headers))
    return out


def expected_answer(release: Release, req: FidelityRequest) -> str:
    """What a proxy must answer: the upstream's name, or 404 for a Host no service on that port names."""
    host = next((v for k, v in req.headers if k.lower() == "host"), None)
    if host is not None and not host_served(host):
        return "404"
    return req.simulate(release).upstream
