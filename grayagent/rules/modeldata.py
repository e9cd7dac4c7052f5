"""The frozen routing model that a valid rule document becomes (see grayagent.rules.model.parse_document)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal

API_VERSION = "grayagent/v1"

FieldKind = Literal["header", "cookie", "query", "path"]
MatchKind = Literal["exact", "prefix", "regex", "in", "present", "list"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Field:
    """Where a request value comes from. Header names are stored lowercased (they are case-insensitive)."""

    kind: FieldKind
    name: str = ""


@dataclass(frozen=True, slots=True)
class StringMatch:
    """One string matcher. `values` holds one string for exact/prefix/regex, several for `in`, none for present,
    the list's name for `list`."""

    kind: MatchKind
    values: tuple[str, ...] = ()
    present: bool = True
    # kind "list": values holds the list's name, members its IDs (resolved at parse time, shared per list).
    members: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ValueCondition:
    field: Field
    match: StringMatch


@dataclass(frozen=True, slots=True)
class CidrCondition:
    networks: tuple[IPNetwork, ...]


Condition = ValueCondition | CidrCondition


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    conditions: tuple[Condition, ...]
    to: str


@dataclass(frozen=True, slots=True)
class AnonymousCookie:
    """The cookie that keeps an anonymous visitor's ID (whenKeyMissing: cookie); max_age in seconds."""

    name: str
    max_age: int


@dataclass(frozen=True, slots=True)
class Split:
    """Weights are in hundredths of a percent (nginx parses two decimals), in document order."""

    key: Field | None
    salt: str
    weights: tuple[tuple[str, int], ...]
    when_key_missing: Literal["default", "random", "cookie"]
    anonymous_cookie: AnonymousCookie | None = None  # set exactly when when_key_missing == "cookie"


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    servers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Listen:
    """host is "" for all addresses, an IPv4 address, or an IPv6 address without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        if not self.host:
            return str(self.port)
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RolloutStep:
    """One step: set the canary's weight (hundredths of a percent), or pause (seconds, or manual)."""

    weight: int | None = None
    pause: float | None = None
    manual: bool = False
    audience: str | None = None            # adds this audience's rule (rollout.audiences) ahead of the split

    def describe(self) -> str:
        if self.audience is not None:
            return f"audience {self.audience}" + (f", weight {Decimal(self.weight) / 100:g}%"
                                                  if self.weight is not None else "")
        if self.weight is not None:
            return f"weight {Decimal(self.weight) / 100:g}%"
        return "pause until promoted" if self.manual else f"pause {self.pause:g}s"

    @property
    def routing(self) -> bool:
        """A step that publishes a stage document (a weight, an audience or both); pauses do not."""
        return self.weight is not None or self.audience is not None


@dataclass(frozen=True, slots=True)
class PrometheusQueries:
    url: str
    error_rate_query: str
    p99_query: str | None = None
    requests_query: str | None = None


@dataclass(frozen=True, slots=True)
class Analysis:
    interval: float                        # seconds
    min_requests: int = 0
    max_error_rate: float | None = None    # 5xx share, 0..1
    max_p99_latency_ms: float | None = None
    relative_to_stable: bool = False
    max_error_rate_factor: float | None = None
    max_p99_latency_factor: float | None = None
    prometheus: PrometheusQueries | None = None


@dataclass(frozen=True, slots=True)
class Audience:
    """A named set of conditions (a rule's match) that a rollout step sends to the canary ahead of the split."""

    name: str
    conditions: tuple[Condition, ...]

    @property
    def rule_name(self) -> str:
        return audience_rule_name(self.name)


def audience_rule_name(audience: str) -> str:
    """The name of the rule a rollout adds for an audience (grayagent/rollout/document.py)."""
    return f"audience-{audience}"


@dataclass(frozen=True, slots=True)
class Rollout:
    """How `grayagent rollout` ramps one service's split; agents ignore it."""

    canary: str
    stable: str
    steps: tuple[RolloutStep, ...]
    analysis: Analysis | None = None
    failure_limit: int = 0
    max_duration: float | None = None      # seconds
    on_failure: Literal["revert", "zero"] = "revert"
    windows: ReleaseWindows | None = None  # when the steps may advance (grayagent/rollout/windows.py)
    audiences: tuple[Audience, ...] = ()


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    listen: Listen
    hosts: tuple[str, ...]
    upstreams: tuple[Upstream, ...]
    default: str
    rules: tuple[Rule, ...]
    split: Split | None
    rollout: Rollout | None = None

    def upstream_names(self) -> tuple[str, ...]:
        return tuple(u.name for u in self.upstreams)


@dataclass(frozen=True, slots=True)
class IdList:
    """A named ID list (spec.lists), IDs in document order; `list` matchers hold its members as a frozenset."""

    name: str
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Release:
    name: str
    services: tuple[Service, ...]
    lists: tuple[IdList, ...] = ()

    def service(self, name: str) -> Service:
        for svc in self.services:
            if svc.name == name:
                return svc
        raise KeyError(name)


def iter_value_fields(release: Release) -> Iterator[Field]:
    """Every request field any rule or split reads, each once, in a stable order."""
    seen: set[Field] = set()
    for svc in release.services:
        fields = [c.field for r in svc.rules for c in r.conditions if isinstance(c, ValueCondition)]
        if svc.split is not None and svc.split.key is not None:
            fields.append(svc.split.key)
        for f in fields:
            if f not in seen:
                seen.add(f)
                yield f


# ---------------------------------------------------------------------------------------------- release windows
# The times below are wall-clock readings in ReleaseWindows.timezone; grayagent/rollout/windows.py turns them
# into instants (DST gaps and folds included).


@dataclass(frozen=True, slots=True)
class AllowWindow:
    """Open from `start` to `end` (minutes after midnight, end exclusive; 1440 = the next midnight) on each
    of `days` (0 = Monday). `start > end` crosses midnight: it closes on the next day at `end`."""

    days: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Freeze:
    """Never advance from `start` until `end` (naive wall-clock datetimes, end exclusive). A whole-day
    freeze ends at midnight after its last day."""

    name: str
    start: datetime
    end: datetime


@dataclass(frozen=True, slots=True)
class ReleaseWindows:
    timezone: str                       # an IANA zone name (zoneinfo)
    allow: tuple[AllowWindow, ...]
    freeze: tuple[Freeze, ...] = ()
