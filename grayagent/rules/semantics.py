"""The semantic stage: checks the schema cannot express, while building the frozen model from schema-valid data."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from typing import Any, cast

from grayagent.errors import Problem
from grayagent.rules.audiencecheck import AudienceChecker
from grayagent.rules.docload import format_path
from grayagent.rules.idlists import check_lists
from grayagent.rules.modeldata import (
    Analysis,
    AnonymousCookie,
    CidrCondition,
    Condition,
    Field,
    IPNetwork,
    Listen,
    MatchKind,
    PrometheusQueries,
    Release,
    Rollout,
    RolloutStep,
    Rule,
    Service,
    Split,
    StringMatch,
    Upstream,
    ValueCondition,
)
from grayagent.rules.regexsubset import check_portable_regex
from grayagent.rules.windowspec import parse_windows
from grayagent.text import is_decimal


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


_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")


def check_server(server: str) -> str | None:
    """None for an IP literal or a DNS name that no proxy or resolver can read as anything else."""
    host, _, port_text = server.rpartition(":")
    if not 1 <= int(port_text) <= 65535:
        return f"port {port_text} is out of range"
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"{host} is not an IPv6 address"
        return None
    if host.lower() == "unix":
        # nginx reads `server unix:...` (any case) as a UNIX-socket path; Envoy would resolve a host "unix".
        return f"{host!r} is not allowed as a host: nginx reads {server!r} as a UNIX-socket path"
    if _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            # inet_aton and many resolvers read 127.1, 0x7f.1 or 2130706433 as IPv4; DNS names never end
            # in a numeric label (RFC 3696 section 2).
            return f"{host!r} is neither an IPv4 address (four decimal numbers 0-255, no leading zeros) nor a DNS name"
    return None


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Request headers the proxies own: Envoy strips x-envoy-* from external requests, grayagent's filters set
# x-grayagent-*. A rule on them would match in one target and not the other, or could be spoofed.
_RESERVED_HEADERS = {"x-envoy-": "Envoy removes x-envoy-* headers from external requests, so nginx and Envoy "
                                 "would route differently",
                     "x-grayagent-": "x-grayagent-* headers are grayagent's own (its filters set them)"}


def value_problem(kind: str, match_kind: str, value: str) -> str | None:
    """Why a request could never carry `value` in a field of `kind`; None when it can."""
    bad = _CONTROL.search(value)
    if bad:
        return (f"contains the control character {bad.group()!r}, which no request can carry (RFC 9110 field "
                "values and request targets exclude it), so this could never match")
    if kind == "header":
        if value[0] in " \t":
            return "starts with a space or tab; proxies strip them from header values, so this could never match"
        if match_kind != "prefix" and value[-1] in " \t":
            return "ends with a space or tab; proxies strip them from header values, so this could never match"
    if kind == "cookie" and ";" in value:
        return "contains ';', which ends a cookie value, so this could never match"
    if kind == "query" and "&" in value:
        return "contains '&', which ends a query parameter, so this could never match"
    if kind == "path" and "?" in value:
        return "contains '?', where the path ends; match the query string with query:"
    return None


def reserved_header_problem(name: str) -> str | None:
    lowered = name.lower()
    return next((why for prefix, why in _RESERVED_HEADERS.items() if lowered.startswith(prefix)), None)


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


def reserved_listen_problems(release: Release, source: str, reserved: dict[str, str]) -> list[Problem]:
    """Services that would listen on one of the agent's own addresses (flag -> "host:port", e.g. the
    status and verify listens). The document cannot know them, so the agent, which does, asks."""
    problems: list[Problem] = []
    for flag, address in reserved.items():
        port = address.rpartition(":")[2]
        taken = parse_listen(address) if is_decimal(port) else None
        if taken is None:
            continue
        for i, svc in enumerate(release.services):
            overlaps = not taken.host or not svc.listen.host or _unspecified(taken.host) \
                or _unspecified(svc.listen.host) or taken.host == svc.listen.host
            if svc.listen.port == taken.port and overlaps:
                problems.append(Problem(source, f"spec.services[{i}].listen",
                                        f"{svc.listen} is the agent's own {flag} address {address}"))
    return problems


def _unspecified(host: str) -> bool:
    return ipaddress.ip_address(host).is_unspecified


class _Reporter:
    """Checks of one part of the document, reporting into a shared problem list."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems

    def problem(self, path: Iterable[str | int], message: str) -> None:
        self.problems.append(Problem(self.source, format_path(path), message))


class MatchChecker(_Reporter):
    """A rule's match: string matchers, header names, source CIDRs."""

    lists: dict[str, frozenset[str]]  # spec.lists by name: `list` matchers resolve to these members

    def string_match(self, raw: dict[str, Any], path: list[str | int], kind: str) -> StringMatch:
        match_kind, value = next(iter(raw.items()))
        if match_kind == "list":
            return self.list_match(value, [*path, "list"])
        if match_kind == "present":
            return StringMatch("present", (), bool(value))
        if match_kind == "regex":
            error = check_portable_regex(value)
            if error:
                self.problem([*path, "regex"], error)
            return StringMatch("regex", (value,))
        values = tuple(value) if match_kind == "in" else (value,)
        for i, text in enumerate(values):
            error = value_problem(kind, match_kind, text)
            if error:
                self.problem([*path, match_kind, i] if match_kind == "in" else [*path, match_kind], error)
        return StringMatch(cast(MatchKind, match_kind), values)

    def cidrs(self, raw: list[str], path: list[str | int]) -> CidrCondition:
        networks: list[IPNetwork] = []
        for i, cidr in enumerate(raw):
            if "%" in cidr:
                # nginx's geo refuses a zone index, while Envoy and the simulator would drop it: the modes diverge.
                self.problem([*path, i], f"{cidr} has a zone index (%...); give the network without it")
                continue
            try:
                networks.append(ipaddress.ip_network(cidr, strict=True))
            except ValueError as exc:
                self.problem([*path, i], str(exc))
        return CidrCondition(tuple(networks))

    def rule(self, raw: dict[str, Any], path: list[str | int], upstreams: set[str]) -> Rule:
        match = raw["match"]
        conditions: list[Condition] = []
        for kind, key in (("header", "headers"), ("cookie", "cookies"), ("query", "query")):
            for name, matcher in match.get(key, {}).items():
                field = Field(kind, name.lower() if kind == "header" else name)  # type: ignore[arg-type]
                matcher_path = [*path, "match", key, name]
                conditions.append(ValueCondition(field, self.string_match(matcher, matcher_path, kind)))
        if "path" in match:
            conditions.append(ValueCondition(Field("path"),
                                             self.string_match(match["path"], [*path, "match", "path"], "path")))
        if "sourceCIDRs" in match:
            conditions.append(self.cidrs(match["sourceCIDRs"], [*path, "match", "sourceCIDRs"]))
        headers_seen: set[str] = set()
        for name in match.get("headers", {}):
            if name.lower() in headers_seen:
                self.problem([*path, "match", "headers", name], "header names are case-insensitive; listed twice")
            headers_seen.add(name.lower())
            reserved = reserved_header_problem(name)
            if reserved:
                self.problem([*path, "match", "headers", name], f"cannot match on it: {reserved}")
        if raw["to"] not in upstreams:
            self.problem([*path, "to"], f"unknown upstream {raw['to']!r}")
        return Rule(raw["name"], tuple(conditions), raw["to"])

    def list_match(self, name: str, path: list[str | int]) -> StringMatch:
        members = getattr(self, "lists", {}).get(name)
        if members is None:
            self.problem(path, f"unknown list {name!r} (spec.lists)")
        return StringMatch("list", (name,), members=members or frozenset())


class ReleaseChecker(_Reporter):
    """Collects semantic problems while building the model from schema-valid data."""

    def __init__(self, source: str) -> None:
        super().__init__(source, [])
        self.matches = MatchChecker(source, self.problems)
        self.rollouts = RolloutChecker(source, self.problems)
        self.rollouts.matches = self.matches  # audiences are matches, checked as rules are

    def split(self, raw: dict[str, Any], path: list[str | int], service: str, upstreams: set[str]) -> Split:
        key: Field | None = None
        if "key" in raw:
            kind, name = next(iter(raw["key"].items()))
            key = Field(kind, name.lower() if kind == "header" else name)
            reserved = reserved_header_problem(name) if kind == "header" else None
            if reserved:
                self.problem([*path, "key", "header"], f"cannot split on it: {reserved}")
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
        return Split(key, raw.get("salt", service), tuple(weights), raw.get("whenKeyMissing", "default"),
                     self.anonymous_cookie(raw, path, key))

    def anonymous_cookie(self, raw: dict[str, Any], path: list[str | int],
                         key: Field | None) -> AnonymousCookie | None:
        """split.anonymousCookie, with its defaults, for whenKeyMissing: cookie; None otherwise."""
        given = raw.get("anonymousCookie")
        if raw.get("whenKeyMissing") != "cookie":
            if given is not None:
                self.problem([*path, "anonymousCookie"], "only used with whenKeyMissing: cookie")
            return None
        given = given or {}
        cookie = AnonymousCookie(given.get("name", ANON_COOKIE_NAME), ANON_COOKIE_MAX_AGE)
        if "maxAge" in given:
            seconds = parse_cookie_age(given["maxAge"])
            if not 1 <= seconds <= ANON_COOKIE_MAX_AGE_LIMIT:
                self.problem([*path, "anonymousCookie", "maxAge"],
                             f"{given['maxAge']} is outside 1s to 400d (browsers cap Max-Age at 400 days)")
            cookie = AnonymousCookie(cookie.name, seconds)
        if key is not None and key.kind == "cookie" and key.name == cookie.name:
            self.problem([*path, "anonymousCookie", "name"],
                         f"{cookie.name!r} is the split key's own cookie; the gateway would overwrite the key")
        return cookie

    def service(self, raw: dict[str, Any], path: list[str | int]) -> Service:
        listen = parse_listen(raw["listen"])
        if listen is None:
            self.problem([*path, "listen"], f"{raw['listen']!r} is not a port or an address:port")
            listen = Listen("", 1)
        elif ":" in listen.host and ipaddress.IPv6Address(listen.host).ipv4_mapped is not None:
            mapped = ipaddress.IPv6Address(listen.host).ipv4_mapped
            self.problem([*path, "listen"], f"{raw['listen']!r} is an IPv4-mapped IPv6 address, which nginx cannot "
                                            f"bind; write {mapped}:{listen.port}")
        upstreams = tuple(Upstream(name, tuple(up["servers"])) for name, up in raw["upstreams"].items())
        names = {u.name for u in upstreams}
        for up in upstreams:
            for i, server in enumerate(up.servers):
                error = check_server(server)
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
            rules.append(self.matches.rule(rule_raw, [*path, "rules", i], names))
        split = self.split(raw["split"], [*path, "split"], raw["name"], names) if "split" in raw else None
        rollout = None
        if "rollout" in raw:
            rollout = self.rollouts.rollout(raw["rollout"], [*path, "rollout"], raw["default"], names, split,
                                            tuple(rules))
        return Service(raw["name"], listen, tuple(h.lower() for h in raw.get("hosts", [])), upstreams,
                       raw["default"], tuple(rules), split, rollout)

    def release(self, data: dict[str, Any]) -> Release:
        lists, list_problems = check_lists(data["spec"].get("lists", {}), self.source)
        self.problems.extend(list_problems)
        self.matches.lists = {id_list.name: frozenset(id_list.values) for id_list in lists}
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
        return Release(data["metadata"]["name"], tuple(services), lists)


class RolloutChecker(_Reporter):
    """A service's rollout section: steps against the split, and the analysis thresholds."""

    matches: MatchChecker

    def rollout(self, raw: dict[str, Any], path: list[str | int], default: str, upstreams: set[str],
                split: Split | None, rules: tuple[Rule, ...] = ()) -> Rollout:
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
            if "pause" in step and len(step) > 1:
                self.problem([*path, "steps", i], f"a pause stands alone; got {', '.join(step)}")
                continue
            if "weight" in step or "audience" in step:
                hundredths = parse_weight(step["weight"]) if "weight" in step else None
                if "weight" in step and hundredths is None:
                    self.problem([*path, "steps", i, "weight"], f"{step['weight']} has more than two decimals")
                    continue
                if hundredths is not None and hundredths + others > 10000:
                    self.problem([*path, "steps", i, "weight"],
                                 f"{step['weight']}% plus the other upstreams' {Decimal(others) / 100}% exceeds 100")
                steps.append(RolloutStep(weight=hundredths, audience=step.get("audience")))
            elif step["pause"] == "manual":
                steps.append(RolloutStep(manual=True))
            else:
                steps.append(RolloutStep(pause=parse_duration(step["pause"])))
        analysis = self.analysis(raw["analysis"], [*path, "analysis"]) if "analysis" in raw else None
        max_duration = parse_duration(raw["maxDuration"]) if "maxDuration" in raw else None
        windows = parse_windows(raw["windows"], [*path, "windows"], self.problem) if "windows" in raw else None
        checks = AudienceChecker(self.source, self.problems, self.matches)
        audiences = checks.audiences(raw, path, canary, rules)
        checks.ramp(raw, path, steps, split, canary, stable)
        return Rollout(canary, stable, tuple(steps), analysis, int(raw.get("failureLimit", 0)), max_duration,
                       raw.get("onFailure", "revert"), windows=windows, audiences=audiences)

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


# Sticky anonymous visitors (split.whenKeyMissing: cookie): the cookie's defaults and bounds.
ANON_COOKIE_NAME = "ga_anon"
ANON_COOKIE_MAX_AGE = 30 * 86400
ANON_COOKIE_MAX_AGE_LIMIT = 400 * 86400  # RFC 6265bis: user agents cap Max-Age at 400 days
_COOKIE_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_cookie_age(text: str) -> int:
    """A cookie lifetime such as '3600s', '90m', '12h', '30d' (whole units; the schema checks the form), in seconds."""
    return int(text[:-1]) * _COOKIE_AGE_UNITS[text[-1]]
