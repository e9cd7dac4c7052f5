"""Smoke tests for the real-etcd fixture in tests/servers/etcd.py."""

from __future__ import annotations

import time
from pathlib import Path

from tests.servers.etcd import EtcdCluster


def test_single_member_put_get(tmp_path: Path) -> None:
    started = time.monotonic()
    with EtcdCluster(tmp_path, size=1) as cluster:
        assert time.monotonic() - started < 5.0
        assert cluster.leader_index() == 0
        rev = cluster.current_revision()
        cluster.put("/grayagent/smoke", "hello")
        assert cluster.get("/grayagent/smoke") == "hello"
        assert cluster.current_revision() == rev + 1


def test_three_members_survive_leader_kill(tmp_path: Path) -> None:
    with EtcdCluster(tmp_path, size=3) as cluster:
        cluster.put("/grayagent/k", "before")
        old = cluster.leader_index()
        cluster.kill_member(old)
        new = cluster.wait_for_leader(timeout=10.0, exclude=old)
        assert new != old
        cluster.put("/grayagent/k", "after")  # etcdctl only dials the live members
        assert cluster.get("/grayagent/k") == "after"
        cluster.start_member(old)
        assert cluster.get("/grayagent/k") == "after"
        assert cluster.etcdctl("get", "/grayagent/k", "--print-value-only",
                               endpoints=[cluster.endpoints[old]], check=True).stdout.strip() == "after"
