"""One definition of health: /healthz, /status, the metrics and `grayagent status` agree in every state."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from grayagent import usecases
from grayagent.runtime.agent import Agent
from grayagent.runtime.agentrun import start_status_server
from grayagent.runtime.health import Observation, State, assess
from grayagent.stores.file import FileStore
from tests.agenthelp import grayagent, http_get, nginx_target, running_agent
from tests.docs import document, dump, service
from tests.servers.proc import free_port, wait_until


def surfaces(status_port: int, store_dir: Path | None) -> dict[str, object]:
    """The state as each surface shows it; `store_dir` None skips `grayagent status` (store unreachable)."""
    base = f"http://127.0.0.1:{status_port}"
    code, body = http_get(f"{base}/healthz")
    healthz = json.loads(body)
    status = json.loads(http_get(f"{base}/status")[1])
    metrics = http_get(f"{base}/metrics")[1]
    one_hot = re.findall(r'^grayagent_health_state\{state="(\w+)",target="nginx"\} 1\.0$', metrics, re.M)
    healthy_gauge = re.search(r'^grayagent_healthy\{target="nginx"\} (\S+)$', metrics, re.M)
    seen: dict[str, object] = {
        "healthz": healthz["state"], "healthz_code": code, "status": status["state"],
        "status_healthy": status["healthy"], "metric_state": one_hot[0] if len(one_hot) == 1 else one_hot,
        "metric_healthy": healthy_gauge.group(1) if healthy_gauge else None,
    }
    if store_dir is not None:
        done = grayagent("status", "--store", str(store_dir), "-o", "json")
        agents = json.loads(done.stdout)["agents"]
        seen["cli"] = agents[0]["state"] if len(agents) == 1 else agents
        text = grayagent("status", "--store", str(store_dir)).stdout
        seen["cli_text"] = next((w for w in State if re.search(rf"\s{w.value}\s", text)), text)
    return seen


def agree(seen: dict[str, object], state: State) -> bool:
    healthy = state is State.HEALTHY
    want: dict[str, object] = {"healthz": state.value, "healthz_code": 200 if healthy else 503, "status": state.value,
                               "status_healthy": healthy, "metric_state": state.value,
                               "metric_healthy": "1.0" if healthy else "0.0"}
    if "cli" in seen:
        want.update(cli=state.value, cli_text=state)
    return seen == want


def wait_state(status_port: int, store_dir: Path | None, state: State) -> None:
    last: list[dict[str, object]] = []

    def check() -> bool:
        last[:] = [surfaces(status_port, store_dir)]
        return agree(last[0], state)
    try:
        wait_until(check, 20, f"every surface to say {state.value}")
    except Exception as exc:
        raise AssertionError(f"expected {state.value} everywhere, saw {last}") from exc


def test_every_surface_shows_the_same_state(tmp_path: Path, nginx, backends) -> None:
    port = free_port()
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    store = FileStore(str(store_dir))
    servers = {n: [f"127.0.0.1:{b.port}"] for n, b in backends.items()}

    def doc(default: str, broken: bool = False) -> bytes:
        data = document(service(listen=f"127.0.0.1:{port}", servers=servers, default=default))
        if broken:  # valid for grayagent, refused by `nginx -t`: a failed apply
            data["spec"]["services"][0]["upstreams"]["canary"]["servers"] = ["does-not-resolve.invalid:80"]
        return dump(data)

    with running_agent(store, nginx, tmp_path / "state", min_apply_interval=0.05, resync_interval=0.3,
                       retry_initial=60, status_interval=0.2) as agent:
        server = start_status_server("127.0.0.1:0", agent)
        try:
            wait_state(server.port, store_dir, State.EMPTY)
            once = grayagent("agent", "--once", "--store", str(store_dir), "--state-dir", str(tmp_path / "once"),
                             "--nginx-conf", str(tmp_path / "unused.conf"))
            assert once.returncode == 1 and once.stdout == "empty: nothing published yet\n", once
            assert "nothing published yet: 1 agent reporting" in grayagent("status", "--store", str(store_dir)).stdout

            store.publish(doc("stable"), 0, "t", "")
            wait_state(server.port, store_dir, State.HEALTHY)

            store.publish(doc("canary", broken=True), 1, "t", "nginx will refuse this")
            wait_state(server.port, store_dir, State.DEGRADED)
            store.publish(doc("canary"), 2, "t", "")
            wait_state(server.port, store_dir, State.HEALTHY)

            usecases.local_revert(tmp_path / "state", nginx_target(nginx), 1, "test pin")
            wait_state(server.port, store_dir, State.PINNED)
            usecases.unpin(tmp_path / "state")
            wait_state(server.port, store_dir, State.HEALTHY)

            nginx.stop()
            wait_state(server.port, store_dir, State.DOWN)
            nginx.start()
            wait_state(server.port, store_dir, State.HEALTHY)

            # The store goes away: `grayagent status` cannot read it either, so only the agent's own surfaces.
            os.rename(store_dir, tmp_path / "store-away")
            wait_state(server.port, None, State.STALE)
            os.rename(tmp_path / "store-away", store_dir)
            wait_state(server.port, store_dir, State.HEALTHY)
            assert isinstance(agent, Agent)
        finally:
            server.stop()


def test_assess_before_the_first_sync_and_without_a_proxy() -> None:
    """The states a running agent shows only for a moment."""
    base = Observation(target="nginx", synced=True, applied=(2, "d"), live=(2, "d"), desired=2, store_reachable=True)
    assert assess(base).state is State.HEALTHY
    assert assess(Observation(**{**base.__dict__, "synced": False})).state is State.STARTING
    assert assess(Observation(**{**base.__dict__, "applied": None, "live": None, "store_reachable": False})) \
        .state is State.DOWN
    damaged = assess(Observation(**{**base.__dict__, "store_reachable": False,
                                    "store_error": "/srv/store/current: not a version number"}))
    assert damaged.state is State.STALE and "(/srv/store/current: not a version number)" in damaged.reason
    full = assess(Observation(**{**base.__dict__, "state_dir_error": "status: No space left on device"}))
    assert full.state is State.DEGRADED and "No space left" in full.reason
