"""Agent orchestration with a target that misbehaves on purpose (pure logic: the proxy is not under test)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from grayagent.rules.model import Release
from grayagent.runtime.agent import Agent, AgentSettings
from grayagent.stores.file import FileStore
from grayagent.targets.base import ApplyResult, RenderedFiles
from tests.docs import document, dump, service


class BrokenTarget:
    name = "broken"
    traffic = None

    def __init__(self, fail_render: bool) -> None:
        self.fail_render = fail_render
        self.applies = 0

    def render(self, release: Release, version: int, digest: str) -> RenderedFiles:
        if self.fail_render:
            raise RuntimeError("renderer bug")
        return {"x": b""}

    def apply(self, files: RenderedFiles, version: int, digest: str) -> ApplyResult:
        self.applies += 1
        raise OSError(28, "No space left on device")

    def live_version(self) -> tuple[int, str] | None:
        return None


def _agent(tmp_path: Path, target: BrokenTarget, retry_initial: float = 60) -> tuple[Agent, FileStore]:
    store = FileStore(str(tmp_path / "store"))
    store.publish(dump(document(service())), 0, "t", "")
    return Agent(store, target, AgentSettings(state_dir=tmp_path / "state", retry_initial=retry_initial)), store


def test_a_renderer_exception_refuses_the_version_and_the_agent_lives(tmp_path: Path) -> None:
    agent, _ = _agent(tmp_path, BrokenTarget(fail_render=True))
    assert agent.sync() is False
    assert agent.sync() is False  # refused for good: no second attempt
    entries = [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in entries] == ["refuse"]
    assert "render failed: RuntimeError: renderer bug" in entries[0]["error"]


def test_an_apply_exception_is_a_failed_apply_retried_with_backoff(tmp_path: Path) -> None:
    target = BrokenTarget(fail_render=False)
    agent, _ = _agent(tmp_path, target)
    assert agent.sync() is False
    assert agent.sync() is False
    assert target.applies == 1, "the retry waits for its backoff"
    assert "apply raised OSError" in (agent.status.last_error or "")


class FlakyTarget(BrokenTarget):
    """Fails the first apply, succeeds afterwards."""

    def __init__(self) -> None:
        super().__init__(fail_render=False)

    def apply(self, files: RenderedFiles, version: int, digest: str) -> ApplyResult:
        self.applies += 1
        return ApplyResult(ok=self.applies > 1, error=None if self.applies > 1 else "nginx -t failed")


def test_an_old_failure_does_not_keep_the_loop_busy(tmp_path: Path) -> None:
    target = FlakyTarget()
    agent, store = _agent(tmp_path, target, retry_initial=0.02)
    assert agent.sync() is False  # version 1 fails; its retry falls due almost at once
    time.sleep(0.05)
    store.publish(dump(document(service(default="canary"))), 1, "t", "")
    assert agent.sync() is True  # version 2 applies
    assert agent._next_timer() > 1.0, "a stale retry entry must not make the loop spin"


def test_a_full_disk_after_a_successful_apply_does_not_stop_the_agent(tmp_path: Path) -> None:
    target = FlakyTarget()
    target.applies = 1  # succeeds at once
    agent, _ = _agent(tmp_path, target)
    (tmp_path / "state" / "cache").write_text("not a directory")  # every cache write now fails
    assert agent.sync() is True
    assert agent.status.applied_version == 1
    (tmp_path / "state" / "pinned.json").write_text("[]")  # valid JSON, not a pin
    assert agent.sync() is True


def test_each_target_reserves_the_agents_own_addresses() -> None:
    from grayagent.runtime.agentrun import AgentOptions, reserved_listens

    nginx = AgentOptions(target="nginx", status_listen="127.0.0.1:9180", verify_listen="127.0.0.1:18089")
    envoy = AgentOptions(target="envoy", status_listen="127.0.0.1:9180", envoy_admin="http://127.0.0.1:9901")
    assert reserved_listens(nginx) == {"--status-listen": "127.0.0.1:9180", "--verify-listen": "127.0.0.1:18089"}
    assert reserved_listens(envoy) == {"--status-listen": "127.0.0.1:9180", "--envoy-admin": "127.0.0.1:9901"}
