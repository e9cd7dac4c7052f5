"""The pre-started `envoy --mode validate` against the real binary."""

from __future__ import annotations

import gc
import json
import subprocess
import tempfile
from pathlib import Path

from grayagent.targets.envoy_validate import PrewarmedValidator
from tests.servers.envoy import envoy_binary

GOOD = {"static_resources": {"clusters": [{
    "name": "c", "connect_timeout": "1s",
    "load_assignment": {"cluster_name": "c", "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9}}}}]}]}}]}}


def test_validates_good_and_bad_candidates_with_the_next_one_started_in_advance(tmp_path: Path) -> None:
    validator = PrewarmedValidator(envoy_binary(), ["--concurrency", "1", "-l", "error"], timeout=30,
                                   work_dir=tmp_path)
    try:
        validator.prewarm()
        waiting = validator._ready
        assert waiting is not None and waiting[0].poll() is None, "a validator waits before any candidate exists"
        code, output = validator.validate(json.dumps(GOOD).encode())
        assert code == 0, output
        assert validator._ready is not None and validator._ready[0].pid != waiting[0].pid  # the next one is ready
        bad = json.loads(json.dumps(GOOD))
        bad["static_resources"]["clusters"][0]["connect_timeout"] = "soon"
        code, output = validator.validate(json.dumps(bad).encode())
        assert code != 0 and "connect_timeout" in output
        # A pre-started validator that died is replaced, not waited on.
        assert validator._ready is not None
        validator._ready[0].kill()
        validator._ready[0].wait()
        assert validator.validate(json.dumps(GOOD).encode())[0] == 0
    finally:
        validator.close()
    assert not validator._dir.exists()


def _system_temp_leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("*envoy-validate-*")}


def test_temporary_files_live_in_the_work_dir_and_never_outlive_the_validator(tmp_path: Path) -> None:
    """Issue 13: `grayagent-envoy-validate-*` dirs piled up in the system temp dir. Now: the work dir only,
    removed on close, on garbage collection, and by the next start after a kill -9 (a dead pid's dir)."""
    in_system_temp = _system_temp_leftovers()
    gone = subprocess.Popen(["true"])  # a pid that has exited
    gone.wait()
    crashed = tmp_path / f"envoy-validate-{gone.pid}-abc123"
    crashed.mkdir()
    (crashed / "candidate-1.json").write_text("{}")
    (tmp_path / f"envoy-validate-{gone.pid}.json").write_text("{}")  # a cold validation's file
    validator = PrewarmedValidator(envoy_binary(), ["--concurrency", "1", "-l", "error"], timeout=30,
                                   work_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [validator._dir.name], "the crash's leftovers are removed"
    assert validator.validate(json.dumps(GOOD).encode())[0] == 0
    validator.close()
    assert list(tmp_path.iterdir()) == []
    dropped = PrewarmedValidator(envoy_binary(), [], timeout=30, work_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    del dropped
    gc.collect()
    assert list(tmp_path.iterdir()) == [], "an unclosed validator's directory goes with it"
    assert _system_temp_leftovers() <= in_system_temp
