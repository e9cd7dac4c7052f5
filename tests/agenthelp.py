"""Running the agent against a test nginx, and talking HTTP through it."""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from grayagent.runtime.agent import Agent, AgentSettings
from grayagent.stores.base import Store
from grayagent.targets.base import Target, poll_stable
from grayagent.targets.nginx import OLD_WORKERS_GRACE, NginxSettings, NginxTarget
from grayagent.targets.nginx_dynamic import NginxDynamicSettings, NginxDynamicTarget
from tests.servers.nginx import NginxInstance


def nginx_target(nginx: NginxInstance, reuseport: bool = False) -> NginxTarget:
    return NginxTarget(NginxSettings(conf=nginx.conf, main_conf=nginx.main_conf, binary=nginx.binary,
                                     verify_listen=nginx.verify_listen, reuseport=reuseport))


def dynamic_target(nginx: NginxInstance, **settings: Any) -> NginxDynamicTarget:
    """nginx dynamic mode on a test nginx started with NginxInstance(..., lua=True)."""
    return NginxDynamicTarget(NginxDynamicSettings(conf=nginx.conf, main_conf=nginx.main_conf, binary=nginx.binary,
                                                   control_listen=nginx.verify_listen, **settings))


@contextmanager
def running_agent_for(store: Store, target: Target, state_dir: Path, **settings: Any) -> Iterator[Agent]:
    """An agent thread driving any target, stopped (and checked stopped) on exit."""
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


@contextmanager
def running_agent(store: Store, nginx: NginxInstance, state_dir: Path, reuseport: bool = False,
                  **settings: Any) -> Iterator[Agent]:
    """An agent thread on a test nginx; `reuseport` lets several test gateways on this host share ports."""
    with running_agent_for(store, nginx_target(nginx, reuseport), state_dir, **settings) as agent:
        yield agent


def wait_live(nginx: NginxInstance, version: int, timeout: float = 15) -> None:
    """Until nginx serves `version` and no old worker still answers (as the agent's own verify defines live):
    a keep-alive connection held by an old worker would otherwise still see the previous rules."""
    target = nginx_target(nginx)
    if not poll_stable(lambda: (target.live_version() or (0, ""))[0] == version, timeout, OLD_WORKERS_GRACE):
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for nginx to serve version {version}")


class Client:
    """One keep-alive connection to the proxy; returns the backend name that answered."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.conn = http.client.HTTPConnection(host, port, timeout=10)

    def get(self, path: str = "/", headers: dict[str, str] | list[tuple[str, str]] | None = None) -> tuple[int, str]:
        items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        for attempt in range(2):
            try:
                self.conn.putrequest("GET", path, skip_accept_encoding=True)
                for k, v in items:
                    self.conn.putheader(k, v.encode("utf-8") if isinstance(v, str) else v)
                self.conn.endheaders()
                resp = self.conn.getresponse()
                body = resp.read().decode("utf-8", "replace")
                return resp.status, body
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    """Status and body of a GET, for any status (the agent's /healthz answers 503 when not healthy)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def grayagent(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "grayagent.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def agent_config(tmp_path: Path, store: Path, nginx: NginxInstance, **keys: Any) -> Path:
    """An agent config file for `nginx`, its state dir under tmp_path; `keys` add or override config keys."""
    values: dict[str, Any] = {"store": store, "state_dir": tmp_path / "state", "nginx_conf": nginx.conf,
                              "nginx_main_conf": nginx.main_conf, "nginx_bin": nginx.binary,
                              "verify_listen": f"'{nginx.verify_listen}'", "min_apply_interval": 0.1, **keys}
    config = tmp_path / "agent.yaml"
    config.write_text("".join(f"{key}: {value}\n" for key, value in values.items()))
    return config


def start_agent(config: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`grayagent agent --config` as its own process; stderr to a file (an undrained pipe would block it)."""
    return subprocess.Popen([sys.executable, "-m", "grayagent.cli", "agent", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))
