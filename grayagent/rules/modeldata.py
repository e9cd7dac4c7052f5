"""The frozen routing model that a valid rule document becomes (see grayagent.rules.model.parse_document)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

API_VERSION = "grayagent/v1"

FieldKind = Literal["header", "cookie", "query", "path"]
MatchKind = Literal["exact", "prefix", "regex", "in", "present"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Field:
    """Where a request value comes from. Header names are stored lowercased (they are case-insensitive)."""

    kind: FieldKind
    name: str = ""


@dataclass(frozen=True, slots=True)
class StringMatch:
    """One string matcher. `values` holds one string for exact/prefix/regex, several for `in`, none for present."""

    kind: MatchKind
    values: tuple[str, ...] = ()
    present: bool = True


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
class Split:
    """Weights are in hundredths of a percent (nginx parses two decimals), in document order."""

    key: Field | None
    salt: str
    weights: tuple[tuple[str, int], ...]
    when_key_missing: Literal["default", "random"]


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
class Release:
    name: str
    services: tuple[Service, ...]

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
