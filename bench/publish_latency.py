"""Publish -> new routing served, through the directory store, the agent and a real nginx. One JSON line.

Each round publishes a version that flips a fixed user between stable and canary, then polls a real
request through nginx until the answer flips. The agent runs as the CLI does, as a separate process.
Publishes are spaced past the agent's --min-apply-interval so every one is measured on its own (bursts
coalesce by design; see test_burst_of_publishes_coalesces_into_few_reloads).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grayagent.stores import open_store
from tests.agenthelp import Client
from tests.docs import document, dump, service
from tests.servers.backends import Backend
from tests.servers.nginx import NginxInstance
from tests.servers.proc import free_port, wait_until


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def run(store_url: str, rounds: int, interval: float, label: str, extra_env: dict[str, str] | None = None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="grayagent-bench-"))
    backends = {n: Backend(n).start() for n in ("stable", "canary")}
    nginx = NginxInstance(work / "nginx").start()
    port = free_port()
    store = open_store(store_url)
    agent = subprocess.Popen([sys.executable, "-m", "grayagent.cli", "agent", "--store", store_url,
                              "--nginx-conf", str(nginx.conf), "--nginx-main-conf", str(nginx.main_conf),
                              "--nginx-bin", nginx.binary, "--verify-listen", nginx.verify_listen,
                              "--state-dir", str(work / "state"), "--min-apply-interval", str(interval),
                              "--status-listen", "127.0.0.1:0"],
                             stderr=open(work / "agent.log", "w"), env=extra_env)  # noqa: SIM115
    latencies: list[float] = []
    keepalive: list[float] = []
    try:
        servers = {n: [f"127.0.0.1:{b.port}"] for n, b in backends.items()}
        client = Client(port)
        for i in range(rounds + 1):
            to = "canary" if i % 2 else "stable"
            doc = document(service(listen=f"127.0.0.1:{port}", servers=servers,
                                   split={"key": {"header": "X-User-Id"},
                                          "weights": {"stable": 100 if to == "stable" else 0,
                                                      "canary": 100 if to == "canary" else 0}},
                                   rules=[{"name": "round", "match": {"headers": {"X-Round": {"exact": str(i)}}},
                                           "to": "stable"}]))
            current = store.current()
            started = time.perf_counter()
            store.publish(dump(doc), current.version if current else 0, "bench", f"round {i}")

            def fresh_flipped(expect: str = to) -> bool:
                fresh = Client(port)  # a new client: what every new connection sees
                try:
                    return fresh.get("/", {"X-User-Id": "fixed-user"})[1] == expect
                finally:
                    fresh.close()

            wait_until(fresh_flipped, 30, f"round {i} to be served", interval=0.002)
            served = time.perf_counter()
            wait_until(lambda expect=to: client.get("/", {"X-User-Id": "fixed-user"})[1] == expect, 30,
                       f"round {i} on the keep-alive connection", interval=0.002)
            if i:  # round 0 includes the agent's start-up
                latencies.append((served - started) * 1000)
                keepalive.append((time.perf_counter() - started) * 1000)
            time.sleep(interval + 0.05)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)
        nginx.stop()
        for b in backends.values():
            b.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {"bench": "publish_to_served", "store": label, "target": "nginx-reload", "publishes": len(latencies),
            "p50_ms": round(statistics.median(latencies), 1), "p99_ms": round(percentile(latencies, 99), 1),
            "max_ms": round(max(latencies), 1), "keepalive_p50_ms": round(statistics.median(keepalive), 1),
            "keepalive_p99_ms": round(percentile(keepalive, 99), 1), "min_apply_interval_s": interval}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--store", action="append", choices=["file", "etcd", "nacos"],
                        help="which stores to measure (repeatable; default: all)")
    args = parser.parse_args()
    for kind in args.store or ["file", "etcd", "nacos"]:
        work = Path(tempfile.mkdtemp(prefix=f"grayagent-bench-{kind}-"))
        try:
            if kind == "file":
                print(json.dumps(run(str(work), args.rounds, args.interval, "file")), flush=True)
            elif kind == "etcd":
                from tests.servers.etcd import EtcdCluster

                with EtcdCluster(work / "etcd", size=1) as cluster:
                    url = f"etcd://{cluster.endpoints[0]}/grayagent/bench"
                    print(json.dumps(run(url, args.rounds, args.interval, "etcd")), flush=True)
            elif kind == "nacos":
                from tests.servers.nacos import NacosServer, nacos_unavailable_reason

                if (reason := nacos_unavailable_reason()) is not None:
                    print(json.dumps({"bench": "publish_to_served", "store": "nacos", "skipped": reason}))
                    continue
                # auth on; the agent (a child process) and this process read the password from the environment
                with NacosServer(work / "nacos", extra_properties={"server.shutdown": "immediate"}) as server:
                    os.environ["GRAYAGENT_NACOS_PASSWORD"] = server.password
                    url = f"nacos://{server.username}@{server.server_addr}/bench"
                    print(json.dumps(run(url, args.rounds, args.interval, "nacos")), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
