"""The rule document: parse, schema check, semantic checks, and the frozen routing model.

`parse_document(content, source)` is the only way in. It either returns a `Release` whose every value is
safe to render into any target, or raises `InvalidDocument` listing every problem as
"SOURCE: path.to.field: what is wrong".
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from typing import Any, Literal, cast

import fastjsonschema
import jsonschema
import yaml

from grayagent.errors import InvalidDocument, Problem
from grayagent.regexsubset import check_portable_regex

MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
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

    def describe(self) -> str:
        if self.weight is not None:
            return f"weight {Decimal(self.weight) / 100:g}%"
        return "pause until promoted" if self.manual else f"pause {self.pause:g}s"


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
class Rollout:
    """How `grayagent rollout` ramps one service's split; agents ignore it."""

    canary: str
    stable: str
    steps: tuple[RolloutStep, ...]
    analysis: Analysis | None = None
    failure_limit: int = 0
    max_duration: float | None = None      # seconds
    on_failure: Literal["revert", "zero"] = "revert"


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


# ---------------------------------------------------------------------------------------------- loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and aliases (a billion-laughs document must not expand)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _NoAliasLoader(_StrictLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.events.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, "aliases are not allowed", mark)
        return super().compose_node(parent, index)


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def load_data(content: bytes, source: str) -> Any:
    """Decode YAML or JSON into plain data, or raise InvalidDocument with one problem."""
    if len(content) > MAX_DOCUMENT_BYTES:
        raise InvalidDocument([Problem(source, "", f"document is {len(content)} bytes; the limit is "
                                                   f"{MAX_DOCUMENT_BYTES}")])
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidDocument([Problem(source, "", f"not UTF-8 (byte {exc.start})")]) from None
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text, object_pairs_hook=_json_pairs)
        except ValueError as exc:
            raise InvalidDocument([Problem(source, "", f"invalid JSON: {exc}")]) from None
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidDocument([Problem(source, "", f"invalid YAML{where}: {problem}")]) from None


# ---------------------------------------------------------------------------------------------- schema


@functools.cache
def schema() -> dict[str, Any]:
    text = resources.files("grayagent").joinpath("schema/grayrelease.schema.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema())
    cls.check_schema(schema())
    validator: jsonschema.protocols.Validator = cls(_enforced_schema())
    return validator


def link_local_url(url: str) -> str | None:
    """Why a metrics URL is refused when its host is a link-local address (cloud metadata: 169.254.169.254,
    fe80::/10, also IPv4-mapped), else None. Names are resolved by the rollout controller (sources.py)."""
    import urllib.parse

    try:
        host = urllib.parse.urlsplit(url).hostname or ""
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    if address.is_link_local or (mapped is not None and mapped.is_link_local):
        return f"{host} is a link-local address (cloud metadata lives there); give the metrics server's address"
    return None


def format_path(parts: Iterable[str | int]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _schema_message(error: jsonschema.ValidationError) -> str:
    """jsonschema's messages quote the whole offending value (1 MB strings included); keep them short."""
    v = error.validator
    sch: dict[str, Any] = error.schema if isinstance(error.schema, dict) else {}
    instance: Any = error.instance
    expected: Any = error.validator_value
    if v == "maxLength":
        return f"longer than {expected} characters"
    if v == "minLength":
        return "must not be empty" if expected == 1 else f"shorter than {expected}"
    if v == "pattern":
        return f"{_short(instance)} does not match {expected}"
    if v == "additionalProperties":
        extra = sorted(set(instance) - set(sch.get("properties", {})))
        return f"unknown field{'s' if len(extra) > 1 else ''}: {', '.join(map(str, extra))}"
    if v == "required":
        missing = [k for k in expected if k not in instance]
        return f"missing required field{'s' if len(missing) > 1 else ''}: {', '.join(missing)}"
    if v == "type":
        return f"{_short(instance)} is not of type {expected}"
    if v == "maxProperties" and expected == 1:
        return f"give exactly one of {', '.join(sch.get('properties', {}))}; got {', '.join(instance)}"
    if v == "minProperties" and expected == 1 and "properties" in sch:
        return f"give one of {', '.join(sch['properties'])}"
    if v == "const":
        return f"must be {expected!r}"
    if v in ("maxItems", "maxProperties"):
        return f"more than {expected} entries"
    message: str = error.message
    return message if len(message) <= 200 else message[:197] + "..."


@functools.cache
def _enforced_schema() -> dict[str, Any]:
    """The published schema with every pattern anchored by \\Z instead of $.

    Both validators use Python's re, where $ also matches before a final newline: "host.example\\n" would
    pass ^...$ and reach a config. \\Z is Python-only, so the published file (for editors, ECMA regex) keeps $.
    """
    def anchor(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (v[:-1] + "\\Z" if k == "pattern" and isinstance(v, str) and v.endswith("$") else anchor(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [anchor(v) for v in node]
        return node

    enforced: dict[str, Any] = anchor(schema())
    return enforced


@functools.cache
def _fast_check() -> Callable[[Any], Any]:
    """fastjsonschema compiles the schema to Python: about 20x faster than jsonschema on large documents."""
    check: Callable[[Any], Any] = fastjsonschema.compile(_enforced_schema())
    return check


def _unencodable(data: Any, path: list[str | int]) -> Iterator[list[str | int]]:
    """Paths of strings that are not valid Unicode (lone surrogates from \\ud800 escapes)."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            yield path
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _unencodable(key, [*path, "<key>"])
            yield from _unencodable(value, [*path, str(key)])
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _unencodable(value, [*path, i])


def _schema_problems(data: Any, source: str) -> list[Problem]:
    try:  # one pass in C; the walk below runs only to name the offending paths
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return [Problem(source, format_path(p), "not valid Unicode (an unpaired surrogate)")
                for p in _unencodable(data, [])]
    except (TypeError, ValueError):
        pass  # not JSON-shaped (YAML dates, sets...): the schema reports it
    try:
        _fast_check()(data)
        return []
    except fastjsonschema.JsonSchemaException:
        pass  # jsonschema explains it: every error, with paths and readable messages
    problems: list[Problem] = []
    for error in sorted(_validator().iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path]):
        path = list(error.absolute_path)
        if error.validator == "propertyNames":
            # jsonschema reports the bad name against its parent; name it in the path instead.
            path.append(error.instance if isinstance(error.instance, str) else "?")
        problems.append(Problem(source, format_path(path), _schema_message(error)))
    return problems


# ---------------------------------------------------------------------------------------------- semantics


def parse_weight(value: Any) -> int | None:
    """A percentage with at most two decimals, as hundredths; None when it has more decimals."""
    try:
        dec = Decimal(str(value))
    except InvalidOperation:
        return None
    hundredths = dec * 100
    if hundredths != hundredths.to_integral_value():
        return None
    return int(hundredths)


DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """'500ms', '30s', '5m', '1h' (decimals allowed) as seconds; raises ValueError otherwise."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)", text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 30s, 5m or 1h")
    return float(match.group(1)) * DURATION_UNITS[match.group(2)]


def parse_listen(value: int | str) -> Listen | None:
    if isinstance(value, int):
        return Listen("", value) if 1 <= value <= 65535 else None
    host, _, port_text = value.rpartition(":")
    if not host:
        port = int(value)
        return Listen("", port) if 1 <= port <= 65535 else None
    port = int(port_text)
    if not 1 <= port <= 65535:
        return None
    host = host[1:-1] if host.startswith("[") else host
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    return Listen(str(addr), port)


def _check_server(server: str) -> str | None:
    host, _, port_text = server.rpartition(":")
    if not 1 <= int(port_text) <= 65535:
        return f"port {port_text} is out of range"
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"{host} is not an IPv6 address"
    return None


class _Checker:
    """Collects semantic problems while building the model from schema-valid data."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []

    def problem(self, path: Iterable[str | int], message: str) -> None:
        self.problems.append(Problem(self.source, format_path(path), message))

    def string_match(self, raw: dict[str, Any], path: list[str | int]) -> StringMatch:
        kind, value = next(iter(raw.items()))
        if kind == "present":
            return StringMatch("present", (), bool(value))
        if kind == "in":
            return StringMatch("in", tuple(value))
        if kind == "regex":
            error = check_portable_regex(value)
            if error:
                self.problem([*path, "regex"], error)
        return StringMatch(cast(MatchKind, kind), (value,))

    def rule(self, raw: dict[str, Any], path: list[str | int], upstreams: set[str]) -> Rule:
        match = raw["match"]
        conditions: list[Condition] = []
        for kind, key in (("header", "headers"), ("cookie", "cookies"), ("query", "query")):
            for name, matcher in match.get(key, {}).items():
                field = Field(kind, name.lower() if kind == "header" else name)  # type: ignore[arg-type]
                conditions.append(ValueCondition(field, self.string_match(matcher, [*path, "match", key, name])))
        if "path" in match:
            conditions.append(ValueCondition(Field("path"), self.string_match(match["path"], [*path, "match", "path"])))
        if "sourceCIDRs" in match:
            networks: list[IPNetwork] = []
            for i, cidr in enumerate(match["sourceCIDRs"]):
                try:
                    networks.append(ipaddress.ip_network(cidr, strict=True))
                except ValueError as exc:
                    self.problem([*path, "match", "sourceCIDRs", i], str(exc))
            conditions.append(CidrCondition(tuple(networks)))
        headers_seen: set[str] = set()
        for name in match.get("headers", {}):
            if name.lower() in headers_seen:
                self.problem([*path, "match", "headers", name], "header names are case-insensitive; listed twice")
            headers_seen.add(name.lower())
        if raw["to"] not in upstreams:
            self.problem([*path, "to"], f"unknown upstream {raw['to']!r}")
        return Rule(raw["name"], tuple(conditions), raw["to"])

    def split(self, raw: dict[str, Any], path: list[str | int], service: str, upstreams: set[str]) -> Split:
        key: Field | None = None
        if "key" in raw:
            kind, name = next(iter(raw["key"].items()))
            key = Field(kind, name.lower() if kind == "header" else name)
        weights: list[tuple[str, int]] = []
        for name, value in raw["weights"].items():
            if name not in upstreams:
                self.problem([*path, "weights", name], f"unknown upstream {name!r}")
            hundredths = parse_weight(value)
            if hundredths is None:
                self.problem([*path, "weights", name], f"{value} has more than two decimals")
                continue
            weights.append((name, hundredths))
        total = sum(w for _, w in weights)
        if len(weights) == len(raw["weights"]) and total != 10000:
            self.problem([*path, "weights"], f"weights sum to {Decimal(total) / 100}, not 100")
        return Split(key, raw.get("salt", service), tuple(weights), raw.get("whenKeyMissing", "default"))

    def service(self, raw: dict[str, Any], path: list[str | int]) -> Service:
        listen = parse_listen(raw["listen"])
        if listen is None:
            self.problem([*path, "listen"], f"{raw['listen']!r} is not a port or an address:port")
            listen = Listen("", 1)
        upstreams = tuple(Upstream(name, tuple(up["servers"])) for name, up in raw["upstreams"].items())
        names = {u.name for u in upstreams}
        for up in upstreams:
            for i, server in enumerate(up.servers):
                error = _check_server(server)
                if error:
                    self.problem([*path, "upstreams", up.name, "servers", i], error)
        if raw["default"] not in names:
            self.problem([*path, "default"], f"unknown upstream {raw['default']!r}")
        rules: list[Rule] = []
        seen_rules: set[str] = set()
        for i, rule_raw in enumerate(raw.get("rules", [])):
            if rule_raw["name"] in seen_rules:
                self.problem([*path, "rules", i, "name"], f"duplicate rule name {rule_raw['name']!r}")
            seen_rules.add(rule_raw["name"])
            rules.append(self.rule(rule_raw, [*path, "rules", i], names))
        split = self.split(raw["split"], [*path, "split"], raw["name"], names) if "split" in raw else None
        rollout = None
        if "rollout" in raw:
            rollout = self.rollout(raw["rollout"], [*path, "rollout"], raw["default"], names, split)
        return Service(raw["name"], listen, tuple(h.lower() for h in raw.get("hosts", [])), upstreams,
                       raw["default"], tuple(rules), split, rollout)

    def rollout(self, raw: dict[str, Any], path: list[str | int], default: str, upstreams: set[str],
                split: Split | None) -> Rollout:
        canary, stable = raw["canary"], raw.get("stable", default)
        for key, name in (("canary", canary), ("stable", stable)):
            if name not in upstreams:
                self.problem([*path, key], f"unknown upstream {name!r}")
        if canary == stable:
            self.problem([*path, "canary"], f"the canary and the stable upstream are both {canary!r}")
        # The controller only rewrites split weights, so the split must exist and name both upstreams.
        others = 0
        if split is None:
            self.problem(path, "a rollout ramps the service's split; add a split whose weights name "
                               f"{stable!r} and {canary!r}")
        else:
            named = {n for n, _ in split.weights}
            for name in (stable, canary):
                if name not in named:
                    self.problem([*path[:-1], "split", "weights"], f"the rollout needs a weight for {name!r}")
            others = sum(w for n, w in split.weights if n not in (stable, canary))
        steps: list[RolloutStep] = []
        for i, step in enumerate(raw["steps"]):
            if "weight" in step:
                hundredths = parse_weight(step["weight"])
                if hundredths is None:
                    self.problem([*path, "steps", i, "weight"], f"{step['weight']} has more than two decimals")
                    continue
                if hundredths + others > 10000:
                    self.problem([*path, "steps", i, "weight"],
                                 f"{step['weight']}% plus the other upstreams' {Decimal(others) / 100}% exceeds 100")
                steps.append(RolloutStep(weight=hundredths))
            elif step["pause"] == "manual":
                steps.append(RolloutStep(manual=True))
            else:
                steps.append(RolloutStep(pause=parse_duration(step["pause"])))
        analysis = self.analysis(raw["analysis"], [*path, "analysis"]) if "analysis" in raw else None
        max_duration = parse_duration(raw["maxDuration"]) if "maxDuration" in raw else None
        return Rollout(canary, stable, tuple(steps), analysis, int(raw.get("failureLimit", 0)), max_duration,
                       raw.get("onFailure", "revert"))

    def analysis(self, raw: dict[str, Any], path: list[str | int]) -> Analysis:
        interval = parse_duration(raw["interval"])
        if interval < 0.1:
            self.problem([*path, "interval"], "shorter than 100ms")
        relative = raw.get("relativeTo") == "stable"
        factors = [k for k in ("maxErrorRateFactor", "maxP99LatencyFactor") if k in raw]
        if relative and not factors:
            self.problem([*path, "relativeTo"], "give maxErrorRateFactor or maxP99LatencyFactor to compare with")
        for key in factors:
            if not relative:
                self.problem([*path, key], "needs relativeTo: stable")
        checks = [k for k in ("maxErrorRate", "maxP99LatencyMs", *factors) if k in raw]
        if not checks:
            self.problem(path, "give at least one threshold: maxErrorRate, maxP99LatencyMs, or a factor")
        prom = raw.get("prometheus")
        queries = None
        if prom is not None:
            queries = PrometheusQueries(prom["url"], prom["errorRateQuery"], prom.get("p99Query"),
                                        prom.get("requestsQuery"))
            if "maxP99LatencyMs" in raw and queries.p99_query is None:
                self.problem([*path, "prometheus"], "maxP99LatencyMs needs a p99Query")
            if (refused := link_local_url(queries.url)) is not None:
                self.problem([*path, "prometheus", "url"], refused)
        return Analysis(interval, int(raw.get("minRequests", 0)), raw.get("maxErrorRate"), raw.get("maxP99LatencyMs"),
                        relative, raw.get("maxErrorRateFactor"), raw.get("maxP99LatencyFactor"), queries)

    def release(self, data: dict[str, Any]) -> Release:
        services: list[Service] = []
        seen: set[str] = set()
        bindings: dict[tuple[int, str], str] = {}
        for i, raw in enumerate(data["spec"]["services"]):
            path: list[str | int] = ["spec", "services", i]
            if raw["name"] in seen:
                self.problem([*path, "name"], f"duplicate service name {raw['name']!r}")
            seen.add(raw["name"])
            svc = self.service(raw, path)
            for host in svc.hosts or ("",):
                # One listen port is one socket in the proxy: services may share it only with distinct hosts.
                binding = (svc.listen.port, host)
                if binding in bindings:
                    shown = f"host {host!r}" if host else "no hosts (catch-all)"
                    owner = bindings[binding]
                    self.problem([*path, "hosts" if host else "listen"],
                                 f"port {svc.listen.port} with {shown} is already used by service {owner!r}")
                bindings[binding] = svc.name
            services.append(svc)
        return Release(data["metadata"]["name"], tuple(services))


def parse_document(content: bytes, source: str) -> Release:
    """Parse and fully validate a rule document; raise InvalidDocument with every problem found."""
    data = load_data(content, source)
    problems = _schema_problems(data, source)
    if problems:
        raise InvalidDocument(problems)
    checker = _Checker(source)
    release = checker.release(data)
    if checker.problems:
        raise InvalidDocument(checker.problems)
    return release


def document_name(content: bytes, source: str) -> str:
    """The release name of a valid document (stores key their entries by it)."""
    data = load_data(content, source)
    name = data.get("metadata", {}).get("name") if isinstance(data, dict) else None
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", name):
        raise InvalidDocument([Problem(source, "metadata.name", "missing or not a valid name")])
    return name


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
