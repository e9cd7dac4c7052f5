"""An idle agent on the directory store must stay idle: its own reads of `current` must not wake it (issue 12.1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from grayagent.stores.file import FileStore
from tests.agenthelp import wait_live
from tests.docs import document, dump, service
from tests.servers.proc import free_port, wait_until

IDLE_SECONDS = 10.0
CPU_BUDGET = 0.02  # of one core


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc (fields 14 and 15, after the parenthesised command name)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_agent_on_directory_store_uses_under_two_percent_cpu(tmp_path: Path, nginx, backends) -> None:
    port = free_port()
    store_dir = tmp_path / "store"
    store = FileStore(str(store_dir))
    servers = {n: [f"127.0.0.1:{b.port}"] for n, b in backends.items()}
    store.publish(dump(document(service(listen=f"127.0.0.1:{port}", servers=servers, default="stable"))), 0, "t", "")
    state = tmp_path / "state"
    argv = [sys.executable, "-m", "grayagent.cli", "agent", "--store", str(store_dir), "--nginx-conf", str(nginx.conf),
            "--nginx-main-conf", str(nginx.main_conf), "--nginx-bin", nginx.binary,
            "--verify-listen", nginx.verify_listen, "--state-dir", str(state)]
    agent = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=(tmp_path / "agent.log").open("w"))
    try:
        wait_live(nginx, 1)
        wait_until(lambda: (state / "status.json").exists()
                   and json.loads((state / "status.json").read_text()).get("healthy") is True, 20, "a healthy agent")
        time.sleep(1.0)  # let start-up work (imports, first apply, first report) finish before measuring
        before = cpu_seconds(agent.pid)
        threading.Event().wait(IDLE_SECONDS)
        used = cpu_seconds(agent.pid) - before
        print(f"idle agent: {used:.3f} s CPU in {IDLE_SECONDS:.0f} s")
        assert agent.poll() is None, (tmp_path / "agent.log").read_text()[-2000:]
        assert used < CPU_BUDGET * IDLE_SECONDS, f"idle agent used {used:.2f} s of CPU in {IDLE_SECONDS:.0f} s"
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)
