"""Break-glass: with the store down, restore an earlier version from the agent's cache, pinned."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from grayagent.stores.file import FileStore
from tests.agenthelp import Client, agent_config, grayagent, nginx_target, start_agent, wait_live
from tests.docs import document, dump, service
from tests.servers.proc import free_port, wait_until


def test_local_revert_from_cache_while_store_is_down(tmp_path: Path, nginx, backends) -> None:
    port = free_port()
    store_dir = tmp_path / "store"
    store = FileStore(str(store_dir))
    servers = {n: [f"127.0.0.1:{b.port}"] for n, b in backends.items()}
    for default in ("stable", "canary"):
        current = store.current()
        store.publish(dump(document(service(listen=f"127.0.0.1:{port}", servers=servers, default=default))),
                      current.version if current else 0, "t", f"all {default}")
    config = agent_config(tmp_path, store_dir, nginx)
    agent = start_agent(config, tmp_path / "agent.log")
    try:
        wait_live(nginx, 2)  # the agent applies only the current version: 1 never reached this host
        # Version 1 was never applied on this host: it is not in the cache, so it cannot be restored here.
        refused = grayagent("local-revert", "1", "--config", str(config))
        assert refused.returncode == 2 and "is not in" in refused.stderr and "(cached: 2)" in refused.stderr
        store.publish(dump(document(service(listen=f"127.0.0.1:{port}", servers=servers, default="beta"))), 2,
                      "t", "all beta (bad)")
        wait_live(nginx, 3)
        os.rename(store_dir, tmp_path / "store-away")  # the store is gone
        listed = json.loads(grayagent("local-revert", "--list", "--config", str(config), "-o", "json").stdout)
        assert [v["version"] for v in listed] == [2, 3]
        done = grayagent("local-revert", "2", "--config", str(config), "-m", "beta broke checkout")
        assert done.returncode == 0, done.stderr
        assert nginx_target(nginx).live_version()[0] == 2
        assert Client(port).get("/")[1] == "canary"
        # The store comes back still pointing at the bad version: the pinned agent leaves nginx alone.
        os.rename(tmp_path / "store-away", store_dir)

        def pinned() -> bool:
            return json.loads((tmp_path / "state" / "status.json").read_text()).get("pinned") == 2
        wait_until(pinned, 15, "the agent to report the pin")
        time.sleep(2)  # the agent has now seen store version 3 and more than one sync: it must leave 2 alone
        assert nginx_target(nginx).live_version()[0] == 2
        assert grayagent("local-revert", "--unpin", "--config", str(config)).returncode == 0
        wait_live(nginx, 3)
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(20) == 0
    events = [json.loads(line)["event"] for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert "break-glass" in events and "unpin" in events
    assert grayagent("audit", "verify", "--state-dir", str(tmp_path / "state")).returncode == 0
