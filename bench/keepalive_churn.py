"""Rule changes under keep-alive load, Envoy and nginx side by side. One JSON line per target.

For each target: two backends, the proxy, a directory store and the agent as a separate process (the CLI);
`wrk -t2 -c32` keeps 32 keep-alive connections busy for a bounded time while the bench publishes
`--changes` rule changes through the store. Each change flips a fixed user between stable and canary and
adds a rule; its publish -> served latency is measured on fresh connections (what every new connection
sees). wrk's socket errors plus its non-2xx responses are the failed requests.

Envoy takes a rule change as an RDS-only file swap: its listeners and connections stay. nginx reloads:
new workers start, and the old ones finish their in-flight requests and close their keep-alive connections.
nginx dynamic mode (`--nginx-mode dynamic`, lua-nginx-module) pushes the change into a shared dict: no
reload, every connection stays.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grayagent.stores import open_store
from grayagent.targets.envoy import EnvoySettings, EnvoyTarget
from tests.agenthelp import Client, dynamic_target, nginx_target
from tests.docs import document, dump, service
from tests.servers.backends import Backend
from tests.servers.envoy import EnvoyInstance, envoy_binary
from tests.servers.nginx import NginxInstance
from tests.servers.proc import free_port, wait_until

CONNECTIONS = 32
THREADS = 2


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def parse_wrk(output: str) -> dict[str, int]:
    """Requests, socket errors and non-2xx/3xx responses from wrk's summary."""
    out = {"requests": 0, "socket_errors": 0, "non_2xx": 0}
    found = re.search(r"(\d+) requests in", output)
    if found:
        out["requests"] = int(found.group(1))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if errors:
        out["socket_errors"] = sum(int(g) for g in errors.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        out["non_2xx"] = int(non2xx.group(1))
    return out


def change(servers: dict[str, list[str]], port: int, i: int) -> bytes:
    to = "canary" if i % 2 else "stable"
    return dump(document(service(listen=f"127.0.0.1:{port}", servers=servers,
                                 split={"key": {"header": "X-User-Id"},
                                        "weights": {"stable": 100 if to == "stable" else 0,
                                                    "canary": 100 if to == "canary" else 0}},
                                 rules=[{"name": "round", "match": {"headers": {"X-Round": {"exact": str(i)}}},
                                         "to": "stable"}])))


def run(target: str, changes: int, interval: float, work: Path, load: bool = True) -> dict[str, Any]:
    backends = {n: Backend(n).start() for n in ("stable", "canary")}
    servers = {n: [f"127.0.0.1:{b.port}"] for n, b in backends.items()}
    port = free_port()
    store_dir = work / "store"
    store = open_store(str(store_dir), publishing=True)  # a new store: its first publish creates it
    proxy: Any
    live: Callable[[], tuple[int, str] | None]
    if target == "envoy":
        proxy = EnvoyInstance(work / "envoy").start()
        args = ["--target", "envoy", "--envoy-dir", str(proxy.envoy_dir), "--envoy-admin", proxy.admin_url,
                "--envoy-bin", envoy_binary()]
        live = EnvoyTarget(EnvoySettings(proxy.envoy_dir, admin_url=proxy.admin_url)).live_version
    else:
        dynamic = target == "nginx-dynamic"
        proxy = NginxInstance(work / "nginx", lua=dynamic).start()
        args = ["--nginx-conf", str(proxy.conf), "--nginx-main-conf", str(proxy.main_conf), "--nginx-bin",
                proxy.binary, "--verify-listen", proxy.verify_listen,
                "--nginx-mode", "dynamic" if dynamic else "reload"]
        live = dynamic_target(proxy).live_version if dynamic else nginx_target(proxy).live_version
    store.publish(change(servers, port, 0), 0, "bench", "round 0")
    agent = subprocess.Popen([sys.executable, "-m", "grayagent.cli", "agent", "--store", str(store_dir), *args,
                              "--state-dir", str(work / "state"), "--min-apply-interval", str(interval)],
                             stderr=open(work / "agent.log", "w"))  # noqa: SIM115
    latencies: list[float] = []
    published_at: dict[int, float] = {}  # version -> wall time of its publish, for publish -> applied
    publish_calls: list[float] = []  # the store's publish itself (directory store: flock, fsyncs, rename)
    wrk: subprocess.Popen[str] | None = None
    try:
        wait_until(lambda: (live() or (0, ""))[0] == 1, 30, f"{target} to serve version 1")
        duration = int(changes * (interval + 0.3)) + 5
        if load:
            wrk = subprocess.Popen(["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{duration}s", "--timeout", "5s",
                                    "-H", "X-User-Id: wrk-user", f"http://127.0.0.1:{port}/"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.0)  # load first, then changes
        for i in range(1, changes + 1):
            expect = "canary" if i % 2 else "stable"
            current = store.current()
            started = time.perf_counter()
            published_at[(current.version if current else 0) + 1] = time.time()
            store.publish(change(servers, port, i), current.version if current else 0, "bench", f"round {i}")
            publish_calls.append((time.perf_counter() - started) * 1000)

            def flipped(expect: str = expect) -> bool:
                fresh = Client(port)
                try:
                    return fresh.get("/", {"X-User-Id": "fixed-user"})[1] == expect
                finally:
                    fresh.close()

            wait_until(flipped, 30, f"change {i} to be served", interval=0.002)
            latencies.append((time.perf_counter() - started) * 1000)
            time.sleep(interval + 0.05)  # past --min-apply-interval: every change is applied on its own
        counts = {"requests": 0, "socket_errors": 0, "non_2xx": 0}
        if wrk is not None:
            output, _ = wrk.communicate(timeout=duration + 30)
            counts = parse_wrk(output)
            if not counts["requests"]:
                raise RuntimeError(f"wrk printed no summary:\n{output}")
    finally:
        if wrk is not None and wrk.poll() is None:
            wrk.kill()
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)
        proxy.stop()
        for b in backends.values():
            b.stop()
    reloads = proxy.reloads() if isinstance(proxy, NginxInstance) else None
    applies = [json.loads(line) for line in (work / "state" / "audit.jsonl").read_text().splitlines()
               if '"apply"' in line]
    # Publish -> the agent's audit entry (written after the proxy verified the version): the agent's share of
    # publish -> served, without the probe's own request through the loaded proxy and backends.
    applied_ms = [(datetime.strptime(a["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
                   - published_at[a["version"]]) * 1000
                  for a in applies if a.get("result") == "ok" and a["version"] in published_at]
    return {"bench": "keepalive_churn", "target": target, "load": f"wrk -t{THREADS} -c{CONNECTIONS}" if load else None,
            "changes": len(latencies),
            "applies_ok": sum(1 for a in applies if a.get("result") == "ok"), "nginx_reloads": reloads,
            "connections": CONNECTIONS, "wrk_requests": counts["requests"],
            "failed_requests": counts["socket_errors"] + counts["non_2xx"],
            "socket_errors": counts["socket_errors"], "non_2xx": counts["non_2xx"],
            "publish_to_served_p50_ms": round(statistics.median(latencies), 1),
            "publish_to_served_p99_ms": round(percentile(latencies, 99), 1),
            "publish_to_served_max_ms": round(max(latencies), 1), "min_apply_interval_s": interval,
            "publish_call_p50_ms": round(statistics.median(publish_calls), 1),
            "publish_call_p99_ms": round(percentile(publish_calls, 99), 1),
            "publish_to_applied_p50_ms": round(statistics.median(applied_ms), 1) if applied_ms else None,
            "publish_to_applied_p99_ms": round(percentile(applied_ms, 99), 1) if applied_ms else None,
            "apply_steps_p50_ms": {step: round(statistics.median(a["steps_ms"][step] for a in applies
                                                                 if step in a.get("steps_ms", {})), 1)
                                   for step in applies[-1].get("steps_ms", {})}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--targets", default="envoy,nginx,nginx-dynamic")
    parser.add_argument("--no-load", action="store_true", help="Measure publish -> served without wrk.")
    args = parser.parse_args()
    if shutil.which("wrk") is None and not args.no_load:
        print(json.dumps({"bench": "keepalive_churn", "skipped": "wrk is not installed"}))
        return
    for target in args.targets.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"grayagent-churn-{target}-"))
        try:
            print(json.dumps(run(target, args.changes, args.interval, work, load=not args.no_load)), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
