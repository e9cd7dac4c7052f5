"""Render time for 10, 1,000 and 10,000 services. Prints one JSON line.

Each service has four rules (header exact, header regex, cookie in, CIDR) and a sticky split, so the
rendered file carries every construct. Parse (schema + semantic checks) is timed apart from render.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grayagent.rules.model import parse_document
from grayagent.stores.base import digest_of
from grayagent.targets.nginx_render import render
from tests.docs import document, dump, service


def make(n: int) -> bytes:
    services = []
    for i in range(n):
        services.append(service(
            f"svc-{i}", listen=10000 + i % 50000, hosts=[f"svc-{i}.example.com"],
            servers={"stable": [f"10.0.{i // 250 % 256}.{i % 250 + 1}:8080"], "canary": [f"10.1.0.{i % 250 + 1}:8080"]},
            rules=[{"name": "testers", "match": {"headers": {"X-Employee": {"exact": "true"}}}, "to": "canary"},
                   {"name": "ios", "match": {"headers": {"User-Agent": {"regex": "iPhone|iPad"}}}, "to": "canary"},
                   {"name": "vip", "match": {"cookies": {"tier": {"in": ["vip", "beta"]}}}, "to": "canary"},
                   {"name": "office", "match": {"sourceCIDRs": ["10.8.0.0/16"]}, "to": "canary"}],
            split={"key": {"header": "X-User-Id"}, "weights": {"stable": 95.5, "canary": 4.5}}))
    return dump(document(*services))


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    figures: dict[str, object] = {"bench": "render_scale"}
    for n in (10, 1000, 10000):
        content = make(n)
        release = parse_document(content, "bench")
        digest = digest_of(content)
        repeat = 5 if n < 10000 else 3
        figures[f"parse_ms_{n}"] = round(best_of(lambda c=content: parse_document(c, "bench"), repeat) * 1000, 1)
        figures[f"render_ms_{n}"] = round(best_of(lambda r=release, d=digest: render(r, 1, d), repeat) * 1000, 1)
        figures[f"conf_bytes_{n}"] = len(render(release, 1, digest))
    figures["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
