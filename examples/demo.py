"""`make demo`: the main job, locally, on the embedded directory store.

Starts two backends and a private nginx on loopback, runs the agent, publishes examples/demo.yaml, sends
traffic with random user ids and prints the observed shares, then publishes a change and a revert.
Everything lives under .demo/ and is stopped at the end.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.agenthelp import Client  # noqa: E402
from tests.servers.backends import Backend  # noqa: E402
from tests.servers.nginx import NginxInstance  # noqa: E402
from tests.servers.proc import wait_until  # noqa: E402

WORK = ROOT / ".demo"
DOC = ROOT / "examples" / "demo.yaml"
LISTEN, STABLE, CANARY, STATUS = 18480, 18481, 18482, 18483


def grayagent(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "grayagent.cli", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"grayagent {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.rstrip()


def live_version(nginx: NginxInstance) -> int:
    try:
        status, body = Client(nginx.verify_port).get("/grayagent/version")
    except OSError:
        return 0
    return int(body.split()[0]) if status == 200 else 0


def traffic(n: int = 3000) -> dict[str, int]:
    client = Client(LISTEN)
    counts = {"stable": 0, "canary": 0}
    for _ in range(n):
        counts[client.get("/", {"X-User-Id": f"user-{random.getrandbits(32)}"})[1]] += 1
    client.close()
    return counts


def show_shares(title: str, weights: dict[str, float], counts: dict[str, int]) -> None:
    total = sum(counts.values())
    print(f"\n{title}: {total} requests with random user ids")
    print(f"  {'upstream':10} {'configured':>10} {'observed':>9}")
    for name, weight in weights.items():
        print(f"  {name:10} {weight:>9.1f}% {100 * counts[name] / total:>8.1f}%")


def main() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    store = WORK / "store"
    store.mkdir()  # an empty store: the agent waits for its first version (a missing one is refused as a typo)
    backends = [Backend("stable", STABLE).start(), Backend("canary", CANARY).start()]
    nginx = NginxInstance(WORK / "nginx").start()
    agent = subprocess.Popen([sys.executable, "-m", "grayagent.cli", "agent", "--store", str(store),
                              "--nginx-conf", str(nginx.conf), "--nginx-main-conf", str(nginx.main_conf),
                              "--nginx-bin", nginx.binary, "--verify-listen", nginx.verify_listen,
                              "--state-dir", str(WORK / "state"), "--min-apply-interval", "0.2",
                              "--status-listen", f"127.0.0.1:{STATUS}"],
                             stderr=open(WORK / "agent.log", "w"))  # noqa: SIM115
    try:
        print(f"store:  {store}\nnginx:  127.0.0.1:{LISTEN} (private instance, config in {nginx.conf})")
        version = grayagent("publish", str(DOC), "--store", str(store), "-m", "canary at 10 %")
        print(f"published {DOC.relative_to(ROOT)} as version {version}")
        wait_until(lambda: live_version(nginx) == 1, 20, "the agent to apply version 1")
        show_shares("version 1 live", {"stable": 90, "canary": 10}, traffic())

        ramped = WORK / "ramp.yaml"
        ramped.write_text(DOC.read_text().replace("{stable: 90, canary: 10}", "{stable: 50, canary: 50}"))
        version = grayagent("publish", str(ramped), "--store", str(store), "-m", "ramp canary to 50 %")
        wait_until(lambda: live_version(nginx) == 2, 20, "the agent to apply version 2")
        show_shares(f"version {version} live", {"stable": 50, "canary": 50}, traffic())

        version = grayagent("revert", "1", "--store", str(store), "-m", "back to 10 % after review")
        wait_until(lambda: live_version(nginx) == int(version), 20, "the agent to apply the revert")
        show_shares(f"version {version} (revert of 1) live", {"stable": 90, "canary": 10}, traffic())

        print("\n$ grayagent history --store .demo/store")
        print(grayagent("history", "--store", str(store)))
        print("\n$ grayagent audit show --state-dir .demo/state")
        print(grayagent("audit", "show", "--state-dir", str(WORK / "state")))
        print("\n$ grayagent audit verify --state-dir .demo/state")
        print(grayagent("audit", "verify", "--state-dir", str(WORK / "state")))
        print(f"\n$ curl -s 127.0.0.1:{STATUS}/healthz")
        print(Client(STATUS).get("/healthz")[1])
        wanted = "^grayagent_(applied_version|apply_total|proxy_reloads)"
        print(f"$ curl -s 127.0.0.1:{STATUS}/metrics | grep -E '{wanted}'")
        metrics = Client(STATUS).get("/metrics")[1]
        print("\n".join(line for line in metrics.splitlines()
                        if line.startswith(("grayagent_applied_version", "grayagent_apply_total",
                                            "grayagent_proxy_reloads_total"))))
        decision = grayagent("route", "--store", str(store), "--service", "product", "--header", "X-Employee=true")
        print(f"\n$ grayagent route --service product --header X-Employee=true\n{decision.rstrip()}")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)
        nginx.stop()
        for b in backends:
            b.stop()
        time.sleep(0.1)
    print("\ndemo finished; everything it started is stopped (files are in .demo/)")


if __name__ == "__main__":
    main()
