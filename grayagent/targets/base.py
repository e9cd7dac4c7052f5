"""What every target offers the agent: pure rendering, and apply with check -> swap -> reload -> verify."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from grayagent.rules.model import Release
from grayagent.targets.traffic import TrafficSampler

RenderedFiles = dict[str, bytes]


@dataclass
class ApplyResult:
    ok: bool
    steps_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    restored: bool = False
    reloaded: bool = False

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.steps_ms[name] = round((time.perf_counter() - started) * 1000, 3)


class StepFailed(Exception):
    """A step of apply failed; the message is the one line that goes into the audit log."""


class Target(Protocol):
    name: str

    @property
    def traffic(self) -> TrafficSampler | None:
        """Per-upstream figures the gateway produces (TrafficSampler.snapshot), or None when not configured.
        The agent starts and stops the sampler; the target's constructor only builds it."""

    def render(self, release: Release, version: int, digest: str) -> RenderedFiles:
        """Pure: the same inputs give byte-identical files."""

    def apply(self, files: RenderedFiles, version: int, digest: str) -> ApplyResult:
        """Install `files` and make the proxy serve them; on any failure leave it serving the last-good files."""

    def live_version(self) -> tuple[int, str] | None:
        """(version, digest) the running proxy serves, or None when it cannot tell."""


def run_command(argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a command given as a list of arguments (never a shell string)."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise StepFailed(f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise StepFailed(f"{argv[0]} {argv[1] if len(argv) > 1 else ''}: timed out after {timeout:.0f}s") from None


def http_get(url: str, timeout: float = 1.0) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Connection": "close"})  # noqa: S310 - our own loopback URL
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return int(response.status), response.read().decode("utf-8", "replace")


def poll_until(check: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return True
        except Exception:  # noqa: S110 - a proxy mid-reload refuses or resets; keep polling
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def poll_stable(check: Callable[[], bool], timeout: float, grace: float, interval: float = 0.005) -> bool:
    """True once `check` has held without a break for `grace` seconds; False if that never happens in time.

    With grace 0 this is the first success. A proxy mid-reload refuses or resets: such errors count as
    a failed check, never as an exception.
    """
    deadline = time.monotonic() + timeout
    holding_since: float | None = None
    while time.monotonic() < deadline:
        try:
            ok = check()
        except Exception:
            ok = False
        if ok:
            holding_since = holding_since if holding_since is not None else time.monotonic()
            if time.monotonic() - holding_since >= grace:
                return True
        else:
            holding_since = None
        time.sleep(interval)
    return False
