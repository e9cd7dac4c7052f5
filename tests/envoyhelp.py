"""Running the agent against a test Envoy (tests/servers/envoy.py), next to agenthelp's nginx helpers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from grayagent.agent import Agent, AgentSettings
from grayagent.stores.base import Store
from grayagent.targets.base import Target
from grayagent.targets.envoy import EnvoySettings, EnvoyTarget
from tests.servers.envoy import EnvoyInstance, envoy_binary
from tests.servers.proc import wait_until


def envoy_instance(tmp_path: Path) -> Iterator[EnvoyInstance]:
    """Body of an `envoy` fixture: `yield from envoy_instance(tmp_path)`."""
    instance = EnvoyInstance(tmp_path / "envoy-proxy").start()
    yield instance
    instance.stop()


def envoy_target(envoy: EnvoyInstance, **settings: Any) -> EnvoyTarget:
    return EnvoyTarget(EnvoySettings(envoy_dir=envoy.envoy_dir, admin_url=envoy.admin_url, binary=envoy_binary(),
                                     **settings))


@contextmanager
def running_agent_for(store: Store, target: Target, state_dir: Path, **settings: Any) -> Iterator[Agent]:
    agent = Agent(store, target, AgentSettings(state_dir=state_dir, **settings))
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield agent
    finally:
        stop.set()
        thread.join(15)
        assert not thread.is_alive(), "agent did not stop"


def wait_target_live(target: Target, version: int, timeout: float = 15) -> None:
    wait_until(lambda: (target.live_version() or (0, ""))[0] == version, timeout,
               f"{target.name} to serve version {version}")
