"""Docs that must stay true: every schema field is documented; the published schema is the packaged one."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "grayagent" / "schema" / "grayrelease.schema.json"


def schema_fields(node: Any, prefix: str = "") -> set[str]:
    """Every property name in the schema, also dotted under its parent (`split.key.header`)."""
    out: set[str] = set()
    if not isinstance(node, dict):
        return out
    for name, sub in node.get("properties", {}).items():
        out |= {name, f"{prefix}.{name}" if prefix else name}
        out |= schema_fields(sub, name if not prefix else f"{prefix}.{name}")
    for key in ("items", "additionalProperties"):
        out |= schema_fields(node.get(key), prefix)
    return out


def test_every_schema_field_is_in_the_rule_reference() -> None:
    schema = json.loads(SCHEMA.read_text())
    names = {n.rsplit(".", 1)[-1] for n in schema_fields(schema)}
    for definition in schema["$defs"].values():
        names |= {n.rsplit(".", 1)[-1] for n in schema_fields(definition)}
    documented = set(re.findall(r"`([A-Za-z0-9_.]+)", (ROOT / "docs" / "rules.md").read_text()))
    documented |= {d.rsplit(".", 1)[-1] for d in documented}
    missing = sorted(names - documented)
    assert not missing, f"docs/rules.md does not document: {', '.join(missing)}"


def test_published_schema_is_the_packaged_one() -> None:
    published = ROOT / "schemas" / "grayrelease.schema.json"
    assert published.read_bytes() == SCHEMA.read_bytes()


def test_readme_opens_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```", 2)[1]
    assert "make demo" in first_block and "make test" in first_block
