"""Fan-out: N agents' watches on one etcd, time from a publish until every one has read the new version.

Each agent is what the agent process runs before rendering: its own EtcdStore (own gRPC channel) with
its own watch on `current`, re-reading `current()` when woken. All N live in this one process; no proxy
is involved (the per-host apply cost is measured by publish_latency.py). One JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grayagent.stores.etcd import EtcdStore
from tests.docs import document, dump
from tests.servers.etcd import EtcdCluster
from tests.servers.proc import wait_until


class WatchingAgent:
    def __init__(self, url: str) -> None:
        self.store = EtcdStore(url)
        self.seen = 0
        self.seen_at: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.store.watch, args=(self, self.stop), daemon=True)

    def changed(self) -> None:
        record = self.store.current()
        if record is not None and record.version > self.seen:
            self.seen = record.version
            self.seen_at[record.version] = time.perf_counter()

    def store_state(self, reachable: bool, detail: str = "") -> None:
        pass


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--publishes", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grayagent-fanout-"))
    try:
        with EtcdCluster(work / "etcd", size=1) as cluster:
            url = f"etcd://{cluster.endpoints[0]}/grayagent/fanout"
            publisher = EtcdStore(url)
            publisher.publish(dump(document()), 0, "bench", "v1")
            started = time.perf_counter()
            agents = [WatchingAgent(url) for _ in range(args.agents)]
            for a in agents:
                a.thread.start()
            wait_until(lambda: all(a.seen == 1 for a in agents), 120, "every agent to read version 1")
            setup_s = time.perf_counter() - started
            all_seen: list[float] = []
            per_agent: list[float] = []
            for n in range(2, args.publishes + 2):
                t0 = time.perf_counter()
                publisher.publish(dump(document()), n - 1, "bench", f"v{n}")
                wait_until(lambda v=n: all(a.seen >= v for a in agents), 60, f"every agent to read version {n}",
                           interval=0.005)
                lags = [(a.seen_at[n] - t0) * 1000 for a in agents]
                per_agent.extend(lags)
                all_seen.append(max(lags))
                time.sleep(0.2)
            for a in agents:
                a.stop.set()
            for a in agents:
                a.thread.join(5)
                a.store.close()
            publisher.close()
        print(json.dumps({
            "bench": "etcd_fanout", "agents": args.agents, "publishes": args.publishes,
            "setup_s": round(setup_s, 2),
            "all_converged_p50_ms": round(statistics.median(all_seen), 1),
            "all_converged_p99_ms": round(percentile(all_seen, 99), 1),
            "per_agent_p50_ms": round(statistics.median(per_agent), 1),
            "per_agent_p99_ms": round(percentile(per_agent, 99), 1),
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "threads_peak": threading.active_count()}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
