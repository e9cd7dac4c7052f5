"""The fleet as `grayagent status` and the rollout pre-flight check see it: every live agent's report, and
whether all of them serve the current version, healthy (each agent's health is runtime/health.py's)."""

from __future__ import annotations

from typing import Any

from grayagent.errors import UsageError
from grayagent.stores.base import FleetStatus, Store


def fleet_status(store: Store, min_agents: int = 1) -> dict[str, Any]:
    """Every live agent, and whether at least `min_agents` report and all serve the current version, healthy.

    An agent that has not reported yet is invisible; `min_agents` is how a pipeline says how many it expects.
    """
    if not isinstance(store, FleetStatus):
        raise UsageError(f"--store: {store.url}: this store keeps no fleet status")
    current = store.current()
    agents = store.fleet()
    version = current.version if current else None
    converged = len(agents) >= max(1, min_agents) and all(
        a.get("applied_version") == version and a.get("healthy") for a in agents)
    return {"current_version": version, "converged": converged, "min_agents": min_agents, "agents": agents}
