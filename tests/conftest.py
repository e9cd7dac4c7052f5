from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers.backends import Backend  # noqa: E402
from tests.servers.nginx import NginxInstance  # noqa: E402

EXAMPLES = ROOT / "examples"


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
