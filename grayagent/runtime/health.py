"""One definition of an agent's health (docs/operations.md, "Health").

`assess` is the only place that decides it. The agent stores the result in its status; /healthz, /status,
the `grayagent_healthy` and `grayagent_health_state` metrics, the fleet status and `grayagent status` all
show that stored result, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    STARTING = "starting"    # no sync has finished yet
    HEALTHY = "healthy"      # the proxy serves the store's current version, and the state dir is writable
    EMPTY = "empty"          # the store is reachable and nothing has been published yet
    DEGRADED = "degraded"    # serving last-good: the newest version failed or was refused, or state is not saved
    STALE = "stale"          # the store is unreachable (or wiped); serving the version applied last (maybe cached)
    PINNED = "pinned"        # a break-glass local revert pinned a version; the store is not followed
    DOWN = "down"            # the proxy does not serve a known version


@dataclass(frozen=True)
class Observation:
    """Everything health depends on, read at one moment."""

    target: str
    synced: bool
    applied: tuple[int, str] | None           # version and digest the agent put live
    live: tuple[int, str] | None              # what the proxy says it serves
    desired: int | None                       # the store's current version (None: nothing published)
    store_reachable: bool
    store_error: str | None = None            # why the store could not be read (unreachable, a damaged entry)
    last_error: str | None = None             # the newest version's failed apply or refusal
    pinned: tuple[int, str] | None = None
    serving_from_cache: bool = False
    state_dir_error: str | None = None        # the status, audit or cache could not be written


@dataclass(frozen=True)
class Health:
    state: State
    reason: str

    @property
    def healthy(self) -> bool:
        return self.state is State.HEALTHY

    @property
    def serving(self) -> bool:
        """The proxy serves a verified version that this host should serve, as far as it can know: the
        store's current, or (store unreachable) the last one it applied, or an operator's pin. `agent --once`
        exits 0 on this; a failed or refused newest version, an empty store or a dead proxy exit 1."""
        return self.state in (State.HEALTHY, State.STALE, State.PINNED)


def assess(o: Observation) -> Health:
    if not o.synced:
        return Health(State.STARTING, "the agent has not finished its first sync")
    if o.pinned is not None:
        if o.live != o.pinned:
            return Health(State.DOWN, f"pinned version {o.pinned[0]} is not live on {o.target}")
        return Health(State.PINNED, f"pinned to version {o.pinned[0]} by a local revert; the store is not followed"
                                    " until `grayagent local-revert --unpin`")
    if o.applied is None:
        if o.last_error:
            return Health(State.DOWN, f"no version applied: {o.last_error}")
        if not o.store_reachable:
            return Health(State.DOWN, f"the store is unreachable{_why(o.store_error)} and no version is cached")
        if o.desired is None:
            return Health(State.EMPTY, "nothing published yet")
        return Health(State.DOWN, "no version applied yet")
    version = o.applied[0]
    if o.live != o.applied:
        return Health(State.DOWN, f"{o.target} does not answer with the applied version {version}")
    if not o.store_reachable:
        source = " (from the local cache)" if o.serving_from_cache else ""
        return Health(State.STALE, f"the store is unreachable{_why(o.store_error)}; serving version {version}{source}")
    if o.desired is None:  # a wiped store: as good as an unreachable one
        return Health(State.STALE, f"the store has nothing published; keeping version {version}")
    if o.last_error:
        return Health(State.DEGRADED, f"serving last-good version {version}: {o.last_error}")
    if o.desired != version:
        return Health(State.DEGRADED, f"serving version {version}; the store's version {o.desired} is not applied yet")
    if o.state_dir_error:
        return Health(State.DEGRADED, f"serving version {version}, but the state dir cannot be written "
                                      f"(audit, cache, status): {o.state_dir_error}")
    return Health(State.HEALTHY, f"serving version {version}, the store's current")


def _why(error: str | None) -> str:
    return f" ({error})" if error else ""
