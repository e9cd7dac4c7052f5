"""Rule documents for tests, built as data so each test states only what it changes."""

from __future__ import annotations

import copy
import json
from typing import Any


def service(name: str = "product", listen: int | str = 8080, servers: dict[str, list[str]] | None = None,
            **extra: Any) -> dict[str, Any]:
    servers = servers or {"stable": ["127.0.0.1:9001"], "canary": ["127.0.0.1:9002"]}
    svc: dict[str, Any] = {"name": name, "listen": listen,
                           "upstreams": {k: {"servers": v} for k, v in servers.items()},
                           "default": next(iter(servers))}
    svc.update(extra)
    return svc


def document(*services: dict[str, Any], name: str = "shop") -> dict[str, Any]:
    return {"apiVersion": "grayagent/v1", "kind": "GrayRelease", "metadata": {"name": name},
            "spec": {"services": [copy.deepcopy(s) for s in services] or [service()]}}


def dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8")
