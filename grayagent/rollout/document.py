"""Rewrite one service's split weights in a rule document; nothing else about the rules changes."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import yaml

from grayagent.errors import UsageError
from grayagent.rules.model import load_data, parse_document, parse_weight


def _number(hundredths: int) -> int | float:
    return hundredths // 100 if hundredths % 100 == 0 else float(Decimal(hundredths) / 100)


def set_canary_weight(content: bytes, source: str, service: str, canary: str, stable: str, hundredths: int) -> bytes:
    """The document with `canary` at `hundredths` and `stable` taking the rest (other upstreams keep theirs).

    The result is validated. YAML comes back as YAML (comments are not kept), JSON as JSON.
    """
    data: Any = load_data(content, source)
    matches = [s for s in data["spec"]["services"] if s.get("name") == service]
    if not matches:
        raise UsageError(f"{source}: no service {service!r}")
    weights: dict[str, Any] = matches[0]["split"]["weights"]
    others = sum(parse_weight(v) or 0 for k, v in weights.items() if k not in (canary, stable))
    if hundredths + others > 10000:
        raise UsageError(f"{source}: {service}: canary weight {_number(hundredths)} leaves no room for the others")
    weights[stable] = _number(10000 - others - hundredths)
    weights[canary] = _number(hundredths)
    if content.lstrip().startswith(b"{"):
        out = json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8")
    else:
        out = yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode("utf-8")
    parse_document(out, source)
    return out


def canary_weight(content: bytes, source: str, service: str, canary: str) -> int:
    """The canary's current split weight in hundredths (0 when the split does not name it)."""
    svc = parse_document(content, source).service(service)
    if svc.split is None:
        return 0
    return dict(svc.split.weights).get(canary, 0)
