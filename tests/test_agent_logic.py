"""Agent orchestration with a target that misbehaves on purpose (pure logic: the proxy is not under test)."""

from __future__ import annotations

import json
from pathlib import Path

from grayagent.agent import Agent, AgentSettings
from grayagent.model import Release
from grayagent.stores.file import FileStore
from grayagent.targets.base import ApplyResult, RenderedFiles
from tests.docs import document, dump, service


class BrokenTarget:
    name = "broken"

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


def _agent(tmp_path: Path, target: BrokenTarget) -> tuple[Agent, FileStore]:
    store = FileStore(str(tmp_path / "store"))
    store.publish(dump(document(service())), 0, "t", "")
    return Agent(store, target, AgentSettings(state_dir=tmp_path / "state", retry_initial=60)), store


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
