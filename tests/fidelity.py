"""A rule document that uses every matcher kind, and a seeded stream of requests that exercise it.

Every target's fidelity test sends the same requests through the real proxy and compares each answer
with grayagent.routing. Path and query stay printable ASCII (what a client puts on a request line);
header and cookie values include unicode, quotes, 4 KB strings and empty values.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from tests.docs import document, service

UPSTREAMS = ("stable", "canary", "beta")

AWKWARD = ["", "é", "中文键", "😀", "a" * 4096, '"quoted"', "'single'", "back\\slash", "$host", "{brace}",
           "x" * 37, "0", " ", "%00", "tab\tinside", "ümlaut-ä", "end "]


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
                req.headers.append(("X-Employee", _pick(rng, "true", "True", "true ", "false", "")))
            if rng.random() < 0.1:
                req.headers.append(("X-User-Tag", _pick(rng, "vip", "VIP", "beta", "中文", "vip2", "")))
            if rng.random() < 0.1:
                req.headers.append(("X-Region", _pick(rng, "bj", "sh12", "gz", "bj-1", "SH", "")))
            if rng.random() < 0.1:
                req.headers.append(("User-Agent", _pick(rng, "Mozilla iPhone", "IPHONE", "android")))
                req.headers.append(("Cookie", _pick(rng, "beta=1", "beta=10", "xbeta=1", "a=2; beta=1")))
            if rng.random() < 0.05:
                req.headers.append(("X-Build", _pick(rng, "2024.1", "2024", "2023.9")))
            if rng.random() < 0.05:
                req.headers.append(("X-Probe", _pick(rng, "1", "")))
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
