"""Per-request cost of sticky anonymous visitors (split.whenKeyMissing: cookie). One JSON line per target.

The same service is measured three ways under `wrk -t2 -c32` keep-alive load: requests with a key (the split
as before, the baseline), anonymous visitors who carry their ID cookie (one more cookie extraction and hash),
and new visitors (a fresh ID and a Set-Cookie on every answer). The upstreams are nginx `return 200` servers,
so the proxy, not a Python backend, is what is measured. Figures are requests per second, the best of
interleaved rounds; on a shared machine compare them within one run only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.keepalive_churn import CONNECTIONS, THREADS, parse_wrk
from grayagent.rules.model import parse_document
from grayagent.stores.base import digest_of
from grayagent.targets.base import Target
from tests.agenthelp import dynamic_target, nginx_target
from tests.docs import document, dump, service
from tests.envoyhelp import envoy_target, wait_target_live
from tests.servers.envoy import EnvoyInstance
from tests.servers.nginx import NginxInstance, lua_available
from tests.servers.proc import free_port, wait_until

VISITOR = "0123456789abcdef0123456789abcdef"
CASES = {"keyed": ["-H", "X-User-Id: wrk-user"], "anonymous-with-id": ["-H", f"Cookie: ga_anon={VISITOR}"],
         "anonymous-new": []}


def upstreams(work: Path) -> tuple[NginxInstance, dict[str, int]]:
    """Two `return 200` servers in one nginx: fast enough not to be the bottleneck."""
    ports = {"stable": free_port(), "canary": free_port()}
    instance = NginxInstance(work / "upstreams")
    instance.conf.parent.mkdir(parents=True, exist_ok=True)
    instance.conf.write_text("".join(f'server {{ listen 127.0.0.1:{port}; access_log off; '
                                     f'location / {{ return 200 "{name}"; }} }}\n' for name, port in ports.items()))
    return instance.start(), ports


def measure(port: int, seconds: int, rounds: int) -> dict[str, int]:
    """The best of `rounds` interleaved runs per case: on a shared machine, the least disturbed one."""
    out = dict.fromkeys(CASES, 0)
    for _ in range(rounds):
        for case, headers in CASES.items():
            done = subprocess.run(["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", *headers,
                                   f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True)
            counts = parse_wrk(done.stdout)
            if counts["socket_errors"] or counts["non_2xx"]:
                raise RuntimeError(f"{case}: failed requests: {counts}")
            out[case] = max(out[case], counts["requests"] // seconds)
    return out


def run(name: str, seconds: int, rounds: int, work: Path, ports: dict[str, int]) -> dict[str, Any]:
    port = free_port()
    servers = {n: [f"127.0.0.1:{p}"] for n, p in ports.items()}
    content = dump(document(service(listen=f"127.0.0.1:{port}", servers=servers, split={
        "key": {"header": "X-User-Id"}, "weights": {"stable": 90, "canary": 10}, "whenKeyMissing": "cookie"})))
    proxy: Any
    target: Target
    if name == "envoy":
        proxy = EnvoyInstance(work / "envoy").start()
        target = envoy_target(proxy)
    else:
        proxy = NginxInstance(work / name, lua=name == "nginx-dynamic").start()
        target = dynamic_target(proxy) if name == "nginx-dynamic" else nginx_target(proxy)
    try:
        result = target.apply(target.render(parse_document(content, "bench"), 1, digest_of(content)), 1,
                              digest_of(content))
        assert result.ok, result.error
        wait_target_live(target, 1)
        wait_until(lambda: subprocess.run(["wrk", "-t1", "-c1", "-d1s", f"http://127.0.0.1:{port}/"],
                                          capture_output=True, check=False).returncode == 0, 10, "the listener")
        return {"bench": "anon_cost", "target": name, "seconds": seconds, "rounds": rounds,
                "req_per_s": measure(port, seconds, rounds),
                "at": datetime.now(UTC).isoformat(timespec="seconds")}
    finally:
        proxy.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=3, help="wrk duration per case and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best one counts")
    parser.add_argument("--targets", default="nginx,nginx-dynamic,envoy")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print(json.dumps({"bench": "anon_cost", "skipped": "wrk is not installed"}))
        return
    with tempfile.TemporaryDirectory(prefix="anon-cost-") as tmp:
        work = Path(tmp)
        backend, ports = upstreams(work)
        try:
            for name in args.targets.split(","):
                if name == "nginx-dynamic" and not lua_available():
                    continue
                print(json.dumps(run(name, args.seconds, args.rounds, work, ports)), flush=True)
        finally:
            backend.stop()


if __name__ == "__main__":
    main()
