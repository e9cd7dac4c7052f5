"""`grayagent rollout status` as an operator runs it: the real CLI against a real directory store, with the
rollouts driven by an in-process controller on a test clock."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from grayagent.cli_rollout import human_duration
from grayagent.rollout import usecases as rollout
from grayagent.rollout.controller import Controller
from grayagent.stores.file import FileStore
from tests.agenthelp import grayagent
from tests.servers.proc import wait_until
from tests.test_rollout_units import Clock, Scripted, doc

RAMP = {"canary": "canary", "steps": [{"weight": 10}, {"pause": "1m"}, {"weight": 100}], "maxDuration": "2h",
        "analysis": {"interval": "10s", "maxErrorRate": 0.05}}


def setup(tmp_path: Path, spec: dict[str, Any] = RAMP) -> tuple[FileStore, Clock, Controller]:
    store = FileStore(str(tmp_path / "store"))
    store.publish(doc(spec), 0, "test", "")
    clock = Clock()
    ctl = Controller(store, interval=1, clock=clock, sources=lambda _: Scripted())
    rollout.start(store, "product", clock)
    return store, clock, ctl


def run_to_success(ctl: Controller, clock: Clock) -> None:
    ctl.tick()         # 10 %
    clock.now += 61    # the pause runs out
    ctl.tick()         # pause done, then 100 %: succeeded
    ctl.tick()


def status(store: FileStore, *args: str) -> subprocess.CompletedProcess[str]:
    return grayagent("rollout", "status", *args, "--store", store.url)


def test_status_before_any_start_says_there_is_no_rollout(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path / "store"))
    store.publish(doc(RAMP), 0, "test", "")
    done = status(store)
    assert done.returncode == 6 and done.stdout == ""
    assert done.stderr.strip() == "grayagent: no rollout has been started (grayagent rollout start SERVICE)"
    done = status(store, "product", "--watch")
    assert done.returncode == 6
    assert "no rollout of 'product' has been started" in done.stderr and "Usage" not in done.stderr


@pytest.mark.parametrize(("ending", "code"), [("succeeded", 0), ("rolled-back", 4), ("aborted", 5)])
def test_watch_exits_by_how_the_rollout_ended(tmp_path: Path, ending: str, code: int) -> None:
    store, clock, ctl = setup(tmp_path)
    if ending == "succeeded":
        run_to_success(ctl, clock)
    elif ending == "aborted":
        ctl.tick()
        rollout.request(store, "product", "abort", clock)
        ctl.tick()
    else:
        ctl.tick()
        clock.now += 3 * 3600  # past maxDuration
        ctl.tick()
    assert store.read_record("product")[0]["phase"] == ending
    done = status(store, "product", "--watch")
    assert done.returncode == code, done.stderr
    assert done.stdout.startswith(f"rollout product: {ending}")
    assert status(store, "product").returncode == 0  # a plain status is a report, not a verdict


def test_human_output_has_human_durations_and_a_clock_that_stops(tmp_path: Path) -> None:
    store, clock, ctl = setup(tmp_path)
    run_to_success(ctl, clock)
    first = status(store, "product").stdout
    time.sleep(1.1)  # the wall clock moves on; the finished rollout's time must not
    second = status(store, "product").stdout
    assert first == second
    head = first.splitlines()[0]
    assert "ran 1m1s of max 2h" in head, head
    assert "pause 1m" in first and "60s" not in first
    for text in (first, status(store).stdout):
        assert "None" not in text and "{" not in text and "'" not in text
    assert "requests 100  5xx 0.00%  p99 10.0ms" in first


def test_a_rollout_not_yet_stamped_shows_no_none(tmp_path: Path) -> None:
    store, _clock, _ctl = setup(tmp_path)
    out = status(store, "product").stdout
    assert "not started by a controller yet" in out and "None" not in out


def test_human_duration() -> None:
    assert [human_duration(s) for s in (0, 0.4, 45, 60, 252, 3600, 5400, 7262.6)] == \
        ["0s", "0s", "45s", "1m", "4m12s", "1h", "1h30m", "2h1m3s"]


def _read_until_exit(fd: int, proc: subprocess.Popen[bytes]) -> bytes:
    out = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the pty closed: the watcher exited
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return out


def _watch(store: FileStore, tty: bool) -> tuple[subprocess.Popen[bytes], int]:
    cmd = [sys.executable, "-m", "grayagent.cli", "rollout", "status", "product", "--watch", "--store", store.url]
    if tty:
        parent, child = pty.openpty()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=child, stderr=child)
        os.close(child)
        return proc, parent
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    return proc, proc.stdout.fileno()


@pytest.mark.parametrize("tty", [True, False])
def test_watch_follows_a_rollout_to_its_end(tmp_path: Path, tty: bool) -> None:
    store, clock, ctl = setup(tmp_path)
    ctl.tick()  # progressing at 10 %
    proc, fd = _watch(store, tty)
    seen = b""
    try:
        def first_frame() -> bool:
            nonlocal seen
            if select.select([fd], [], [], 0.1)[0]:
                seen += os.read(fd, 65536)
            return b"progressing" in seen
        wait_until(first_frame, 20, "the first frame")
        time.sleep(2.5)  # a few redraws on a terminal; nothing new to print without one
        clock.now += 61
        ctl.tick()
        ctl.tick()
        seen += _read_until_exit(fd, proc)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if tty:
            os.close(fd)
    text = seen.decode()
    assert text.count("rollout product: succeeded") == 1
    if tty:
        assert text.count("\x1b[J") >= 2  # redrawn in place: up to the frame's first line, erase, draw
        frames = text.split("\x1b[J")
        assert "progressing" in frames[0] and "succeeded" in frames[-1] and "progressing" not in frames[-1]
    else:
        assert "\x1b" not in text
        # A frame per change (at most the two writes of the ticks above), not one per second.
        assert 1 <= text.count("rollout product: progressing") <= 2
