from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers.backends import Backend  # noqa: E402
from tests.servers.nginx import NginxInstance  # noqa: E402

EXAMPLES = ROOT / "examples"

# Agents started through the CLI by tests bind /healthz and /metrics on an ephemeral port, so several can
# run at once (and beside any agent on this host's default 9180).
os.environ.setdefault("GRAYAGENT_STATUS_LISTEN", "127.0.0.1:0")


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[NginxInstance]:
    instance = NginxInstance(tmp_path / "nginx").start()
    yield instance
    instance.stop()


@pytest.fixture
def backends() -> Iterator[dict[str, Backend]]:
    started = {name: Backend(name).start() for name in ("stable", "canary", "beta")}
    yield started
    for b in started.values():
        b.stop()
