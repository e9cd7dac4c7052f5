"""The manual that ships with the package: `grayagent docs TOPIC`.

A wheel carries copies of docs/*.md, README.md and the deploy/ examples in grayagent/_docs/ (setup.py copies
them at build time); a source checkout (editable install) reads the originals, so the repository holds one copy.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from grayagent.errors import UsageError

# topic -> file in the source tree
SOURCES: dict[str, str] = {
    "readme": "README.md",
    "operations": "docs/operations.md",
    "stores": "docs/stores.md",
    "rules": "docs/rules.md",
    "routing-semantics": "docs/routing-semantics.md",
    "rollout": "docs/rollout.md",
    "architecture": "docs/architecture.md",
    "agent-config": "deploy/agent.example.yaml",
    "agent-unit": "deploy/grayagent-agent.service",
    "rollout-unit": "deploy/grayagent-rollout.service",
    "envoy-bootstrap": "deploy/envoy/bootstrap.yaml",
}

PACKAGE = Path(__file__).resolve().parent
SHIPPED = PACKAGE / "_docs"
CHECKOUT = PACKAGE.parent


def path(topic: str) -> Path:
    """The file behind `topic`: the wheel's copy, or the checkout's original."""
    source = SOURCES.get(topic)
    if source is None:
        close = difflib.get_close_matches(topic, SOURCES, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UsageError(f"docs: no topic {topic!r}{hint} (`grayagent docs` lists them)")
    shipped = SHIPPED / f"{topic}{Path(source).suffix}"
    return shipped if shipped.is_file() else CHECKOUT / source


def read(topic: str) -> str:
    try:
        return path(topic).read_text("utf-8")
    except FileNotFoundError:
        raise UsageError(f"docs: {topic}: not installed with this copy of grayagent") from None


def title(topic: str) -> str:
    """The first heading or comment line of a topic, for the list."""
    for line in read(topic).splitlines():
        stripped = line.lstrip("#").strip()
        if stripped:
            return stripped
    return ""
