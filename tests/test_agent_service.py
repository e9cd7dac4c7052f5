"""The agent as a service: config file and precedence, /healthz and /metrics, sd_notify, SIGHUP, systemd units."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from grayagent.errors import InvalidDocument
from grayagent.runtime.agentrun import resolve_options
from grayagent.stores.file import FileStore
from tests.agenthelp import Client, agent_config, grayagent, http_get, start_agent, wait_live
from tests.docs import document, dump, service
from tests.servers.proc import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("store: /from/file\nstate_dir: /file/state\nnginx_conf: /file/ga.conf\nmin_apply_interval: 3\n")
    env = {"GRAYAGENT_STATE_DIR": "/env/state", "GRAYAGENT_MIN_APPLY_INTERVAL": "2.5"}
    options = resolve_options({"min_apply_interval": 0.5}, str(config), env)
    assert (options.store, options.state_dir, options.min_apply_interval) == ("/from/file", "/env/state", 0.5)
    assert options.nginx_conf == "/file/ga.conf" and options.target == "nginx"


def test_bad_config_file_names_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("store: /s\nstate_dir: /x\nnginx_cnof: /typo.conf\nmin_apply_interval: soon\n")
    with pytest.raises(InvalidDocument) as info:
        resolve_options({}, str(config), {})
    lines = [str(p) for p in info.value.problems]
    assert any(line.startswith(f"{config}: min_apply_interval: 'soon' is not of type 'number'") for line in lines)
    assert f"{config}: nginx_cnof: unknown key; did you mean nginx_conf?" in lines, lines
    done = grayagent("agent", "--config", str(config))
    assert done.returncode == 1 and all(line.startswith(str(config)) for line in done.stderr.splitlines())


@pytest.fixture
def notify_socket(tmp_path: Path):
    """What systemd does: a datagram socket, read continuously; yields the list of messages received."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    received: list[str] = []
    done = threading.Event()

    def drain() -> None:
        while not done.is_set():
            try:
                received.append(sock.recv(4096).decode())
            except TimeoutError:
                continue

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    yield received, path
    done.set()
    reader.join(2)
    sock.close()


def test_service_health_metrics_notify_and_reload(tmp_path: Path, nginx, backends, notify_socket) -> None:
    messages, sock_path = notify_socket
    port, status_port = free_port(), free_port()
    store = FileStore(str(tmp_path / "store"))
    servers = {n: [f"127.0.0.1:{b.port}"] for n, b in backends.items()}
    store.publish(dump(document(service(listen=f"127.0.0.1:{port}", servers=servers))), 0, "t", "")
    config = agent_config(tmp_path, tmp_path / "store", nginx, status_listen=f"'127.0.0.1:{status_port}'")
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"}
    env.pop("GRAYAGENT_STATUS_LISTEN", None)
    log = tmp_path / "agent.log"  # a file, not a pipe: an undrained pipe would block the agent's logging
    agent = start_agent(config, log, env)
    try:
        wait_live(nginx, 1)
        wait_until(lambda: http_get(f"http://127.0.0.1:{status_port}/healthz")[0] == 200, 10, "/healthz to say ready")
        health = json.loads(http_get(f"http://127.0.0.1:{status_port}/healthz")[1])
        assert health["applied_version"] == 1 and health["store_reachable"] is True
        metrics = http_get(f"http://127.0.0.1:{status_port}/metrics")[1]
        assert re.search(r'^grayagent_applied_version\{target="nginx"\} 1\.0$', metrics, re.M)
        assert re.search(r'^grayagent_apply_total\{result="ok",target="nginx"\} 1\.0$', metrics, re.M)
        assert 'grayagent_apply_step_seconds_bucket{le="0.5",step="reload",target="nginx"}' in metrics
        assert re.search(r'^grayagent_store_up\{target="nginx"\} 1\.0$', metrics, re.M)
        assert "grayagent_watch_lag_seconds" in metrics and "grayagent_proxy_reloads_total" in metrics
        wait_until(lambda: "WATCHDOG=1" in messages, 10, "a watchdog ping")
        assert messages[0].startswith("READY=1") and "serving version 1" in messages[0]

        # nginx stops answering: /healthz says so, though the agent's last apply was fine.
        nginx.stop()
        wait_until(lambda: http_get(f"http://127.0.0.1:{status_port}/healthz")[0] == 503, 10, "/healthz to fail")
        nginx.start()

        # SIGHUP with a broken file: refused and audited, the agent carries on.
        good = config.read_text()
        config.write_text(good + "bogus_key: 1\n")
        agent.send_signal(signal.SIGHUP)
        wait_until(lambda: "config-refused" in (tmp_path / "state" / "audit.jsonl").read_text(), 10, "the refusal")
        store.publish(dump(document(service(listen=f"127.0.0.1:{port}", servers=servers, default="canary"))), 1,
                      "t", "")
        wait_live(nginx, 2)
        assert Client(port).get("/")[1] == "canary"
        # SIGHUP with a good file: the new settings take effect (a new status port).
        status_port2 = free_port()
        config.write_text(good.replace(str(status_port), str(status_port2)))
        agent.send_signal(signal.SIGHUP)
        wait_until(lambda: http_get(f"http://127.0.0.1:{status_port2}/healthz")[0] == 200, 15, "the reloaded agent")
        assert agent.poll() is None
    finally:
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(20)
    assert code == 0, log.read_text()[-3000:]
    assert "STOPPING=1" in messages and "RELOADING=1" in messages


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", ["grayagent-agent.service", "grayagent-rollout.service"])
def test_systemd_units_verify(tmp_path: Path, unit: str) -> None:
    """`systemd-analyze verify` checks syntax, directives and that ExecStart exists; point it at this venv."""
    text = (ROOT / "deploy" / unit).read_text().replace("/usr/local/bin/grayagent",
                                                         str(Path(sys.executable).parent / "grayagent"))
    (tmp_path / unit).write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)], capture_output=True, text=True,
                          check=False)
    problems = [line for line in done.stderr.splitlines() if unit in line or "Unknown" in line]
    assert done.returncode == 0 and not problems, done.stderr


def test_a_reloaded_config_that_cannot_start_keeps_the_running_one(tmp_path: Path, nginx, backends) -> None:
    """Valid on paper, unusable in practice (its status port is taken): refused and audited, agent lives on."""
    port, status_port = free_port(), free_port()
    store = FileStore(str(tmp_path / "store"))
    servers = {n: [f"127.0.0.1:{b.port}"] for n, b in backends.items()}
    store.publish(dump(document(service(listen=f"127.0.0.1:{port}", servers=servers))), 0, "t", "")
    config = tmp_path / "agent.yaml"
    good = (f"store: {tmp_path / 'store'}\nstate_dir: {tmp_path / 'state'}\nnginx_conf: {nginx.conf}\n"
            f"nginx_main_conf: {nginx.main_conf}\nnginx_bin: {nginx.binary}\nverify_listen: '{nginx.verify_listen}'\n"
            f"status_listen: '127.0.0.1:{status_port}'\n")
    config.write_text(good)
    env = {k: v for k, v in os.environ.items() if k != "GRAYAGENT_STATUS_LISTEN"}
    agent = start_agent(config, tmp_path / "agent.log", env)
    taken = socket.socket()
    try:
        wait_until(lambda: http_get(f"http://127.0.0.1:{status_port}/healthz")[0] == 200, 15, "the agent")
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config.write_text(good.replace(str(status_port), str(taken.getsockname()[1])))
        agent.send_signal(signal.SIGHUP)
        wait_until(lambda: "config-refused" in (tmp_path / "state" / "audit.jsonl").read_text(), 15, "the refusal")
        wait_until(lambda: http_get(f"http://127.0.0.1:{status_port}/healthz")[0] == 200, 15, "the old config back")
        assert agent.poll() is None
    finally:
        taken.close()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(20) == 0
