"""The state dir: its layout and cleanup (state.py), and an agent whose state disk fills up."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from grayagent.agent import Agent, AgentSettings
from grayagent.agentrun import AgentOptions, build_agent
from grayagent.audit import read_entries, verify
from grayagent.fsutil import atomic_write
from grayagent.model import Release
from grayagent.state import StateDir
from grayagent.stores.file import FileStore
from grayagent.targets.base import ApplyResult, RenderedFiles
from tests.agenthelp import grayagent
from tests.docs import document, dump, service
from tests.test_agent_cli import fill, small_tmpfs


class MemoryTarget:
    """A proxy that always takes the files and then serves what it was given (the proxy is not under test)."""

    name = "memory"

    def __init__(self) -> None:
        self.live: tuple[int, str] | None = None

    def render(self, release: Release, version: int, digest: str) -> RenderedFiles:
        return {"x": b""}

    def apply(self, files: RenderedFiles, version: int, digest: str) -> ApplyResult:
        self.live = (version, digest)
        return ApplyResult(ok=True)

    def live_version(self) -> tuple[int, str] | None:
        return self.live


def test_a_full_state_disk_is_degraded_logged_once_and_leaves_a_gap_marker(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path / "store"))
    store.publish(dump(document(service())), 0, "t", "")
    with small_tmpfs(tmp_path / "state", "256k") as state_dir:
        agent = Agent(store, MemoryTarget(), AgentSettings(state_dir=state_dir, min_apply_interval=0))
        agent.audit.append("start", target="memory")
        assert agent.sync() is True and agent.status.state == "healthy"
        filler = fill(state_dir)

        store.publish(dump(document(service(default="canary"))), 1, "t", "")
        with capture_logs() as logs:
            assert agent.sync() is False
            health = agent.health()
            for _ in range(200):  # what a spinning loop would do: the log must not follow it
                agent.sync()
                agent.health()
        assert agent.status.applied_version == 2, "the proxy was updated all the same"
        assert agent.status.state == "degraded" and "No space left on device" in agent.status.reason
        assert health[0] is False and health[1]["state"] == "degraded"
        state_lines = [e for e in logs if e["event"].startswith("state dir not writable")]
        assert len(state_lines) == 1, logs[:5]
        assert len(logs) <= 3, [e["event"] for e in logs]

        filler.unlink()  # space returns
        assert agent.sync() is True and agent.status.state == "healthy"
        gaps = [e for e in read_entries(state_dir) if e["event"] == "gap"]
        assert len(gaps) == 1 and gaps[0]["reason"] == "write_failed", gaps
        assert gaps[0]["lost_events"] == ["apply"] and gaps[0]["lost"] == 1
        assert json.loads((state_dir / "status.json").read_text())["state"] == "healthy"

        # The gap keeps `audit verify` failing, and only that, until an operator acknowledges it.
        problems = verify(state_dir)
        assert len(problems) == 1 and f"gap at seq {gaps[0]['seq']} (write_failed)" in problems[0], problems
        assert grayagent("audit", "verify", "--state-dir", str(state_dir)).returncode == 1
        done = grayagent("audit", "ack", "--state-dir", str(state_dir), "--reason", "disk full, space freed")
        assert done.returncode == 0, done.stderr
        done = grayagent("audit", "verify", "--state-dir", str(state_dir))
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_next_start_removes_what_a_crash_left(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    scratch = state.tmp_dir()
    (scratch / "grayagent-envoy-validate-abc").mkdir()
    (scratch / "grayagent-envoy-validate-abc" / "bootstrap.yaml").write_text("x")
    (scratch / "half-written").write_text("x")
    (state.root / ".status.json.k3j2.tmp").write_text("{")  # atomic_write killed between write and rename
    store_cache = state.cache_dir / "0123456789abcdef"  # one store's cache (stores/localcache.py)
    store_cache.mkdir(parents=True)
    (store_cache / ".0000000003.json.abcd.tmp").write_text("{")
    (store_cache / "0000000003.json").write_text("{}")
    (tmp_path / "store").mkdir()
    options = AgentOptions(store=str(tmp_path / "store"), state_dir=str(state.root),
                           nginx_conf=str(tmp_path / "ga.conf"))
    build_agent(options).store.close()  # what every start (and every SIGHUP reload) runs first
    assert list(scratch.iterdir()) == []
    assert not (state.root / ".status.json.k3j2.tmp").exists()
    assert [p.name for p in store_cache.iterdir()] == ["0000000003.json"]
    assert oct(scratch.stat().st_mode & 0o777) == "0o700" and oct(state.root.stat().st_mode & 0o777) == "0o750"


def test_temp_directory_is_removed_however_the_block_ends(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    with pytest.raises(RuntimeError), state.temp_directory("work-") as work:
        (work / "f").write_text("x")
        raise RuntimeError("boom")
    assert not work.exists() and work.parent == state.tmp_dir()


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "64k") as disk:
        fill(disk)
        with pytest.raises(OSError) as info:
            atomic_write(disk / "status.json", b"x" * 8192)
        assert info.value.filename == str(disk / "status.json")
        assert [p.name for p in disk.iterdir()] == ["filler"], "no temp file is left behind"


def test_local_revert_and_unpin_use_the_state_layout(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    env = {k: v for k, v in os.environ.items() if k != "GRAYAGENT_NGINX_CONF"}
    # --list and --unpin only read the state dir: no proxy options needed.
    done = grayagent("local-revert", "--unpin", "--state-dir", str(state.root), env=env)
    assert done.returncode == 2 and "no such directory" in done.stderr, done  # a mistyped path says so
    state.root.mkdir(exist_ok=True)
    done = grayagent("local-revert", "--unpin", "--state-dir", str(state.root), env=env)
    assert (done.returncode, done.stdout) == (0, "nothing was pinned\n"), done
    state.pin.write_text(json.dumps({"version": 1, "digest": "d"}))
    done = grayagent("local-revert", "--unpin", "--state-dir", str(state.root), env=env)
    assert done.stdout == "unpinned: the agent follows the store again\n" and not state.pin.exists()
    assert [e["event"] for e in read_entries(state.root)] == ["unpin"]


def test_an_idle_pass_writes_no_status(tmp_path: Path) -> None:
    """Each pass used to rewrite status.json (temp file, fsync, rename): with a store that wakes the agent
    often, that is disk work for nothing. Only a change is written."""
    store = FileStore(str(tmp_path / "store"))
    store.publish(dump(document(service())), 0, "t", "")
    agent = Agent(store, MemoryTarget(), AgentSettings(state_dir=tmp_path / "state"))
    assert agent.sync() is True
    status = tmp_path / "state" / "status.json"
    before = status.stat().st_ino
    for _ in range(5):
        agent.sync()
        agent.health()
    assert status.stat().st_ino == before
    store.publish(dump(document(service(default="canary"))), 1, "t", "")
    agent.sync()
    assert status.stat().st_ino != before and json.loads(status.read_text())["applied_version"] == 2


def test_a_pass_that_raises_is_reported_through_the_same_assessment(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path / "store"))
    store.publish(dump(document(service())), 0, "t", "")
    agent = Agent(store, MemoryTarget(), AgentSettings(state_dir=tmp_path / "state"))
    assert agent.sync() is True

    def broken() -> None:
        raise RuntimeError("a bug")

    agent.store.current = broken  # type: ignore[method-assign,assignment]
    stop = threading.Event()
    stop.set()  # no pause after the failure
    agent._guarded_sync(stop)
    status = json.loads((tmp_path / "state" / "status.json").read_text())
    assert (status["state"], status["healthy"]) == ("degraded", False)
    assert "sync failed: RuntimeError: a bug" in status["reason"]
