"""Running the agent against a test Envoy (tests/servers/envoy.py), next to agenthelp's nginx helpers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def wait_target_live(target: Target, version: int, timeout: float = 15) -> None:
    wait_until(lambda: (target.live_version() or (0, ""))[0] == version, timeout,
               f"{target.name} to serve version {version}")
