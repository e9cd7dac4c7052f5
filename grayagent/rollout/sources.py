"""Where the controller gets a canary's figures.

`FleetSource` (default): the cumulative per-upstream counters every agent puts in its fleet status entry,
summed over the fleet. A window is the difference between two samples; the baseline sample is part of the
rollout's persisted state, so a restarted controller keeps its window. An agent whose `boot` changed
restarted, and its counters count from zero again; an agent missing from the baseline with an unchanged (or
unknown) `boot` takes its current counters as its baseline.

`PrometheusSource`: PromQL instant queries over the HTTP API (/api/v1/query); the queries do their own
windowing ({{interval}} is substituted, e.g. rate(...[{{interval}}])). A rollout names its Prometheus URL, so
the controller must not become a way to reach what only it can reach: a host that resolves to a link-local
address (cloud metadata) is refused, redirects are not followed, and `rollout run --metrics-host` limits the
hosts to an allow-list (`check_metrics_host`).
"""

from __future__ import annotations

import ipaddress
import math
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import Any, Protocol

from grayagent.errors import StoreError, UsageError
from grayagent.rollout.analysis import Measurement, measurement_from_counters
from grayagent.rules.docload import loads_json
from grayagent.rules.model import Analysis, PrometheusQueries, link_local_url
from grayagent.stores.base import FleetStatus
from grayagent.text import is_decimal


class MetricsSource(Protocol):
    def measure(self, service: str, upstreams: tuple[str, str], window: dict[str, Any] | None,
                spec: Analysis) -> tuple[tuple[Measurement, Measurement] | None, dict[str, Any]]:
        """((canary, stable) over the window, or None when there is no window yet; the state to keep)."""


Sample = dict[str, dict[str, Any]]  # host -> {"boot", "<upstream>": counters}


def _fleet_sample(fleet: FleetStatus, service: str, upstreams: tuple[str, ...]) -> Sample:
    sample: Sample = {}
    for entry in fleet.fleet():
        traffic = entry.get("traffic")
        if not isinstance(traffic, dict):
            continue
        ups = traffic.get("upstreams", {})
        host: dict[str, Any] = {"boot": traffic.get("boot"), "le": traffic.get("latency_le", [])}
        for up in upstreams:
            counters = ups.get(f"{service}/{up}")
            if isinstance(counters, dict):
                host[up] = counters
        sample[str(entry.get("host"))] = host
    return sample


def _delta(now: Sample, base: Sample, upstream: str) -> tuple[int, int, list[float], list[int]]:
    requests = errors = 0
    bounds: list[float] = []
    buckets: list[int] = []
    for host, entry in now.items():
        cur = entry.get(upstream)
        if cur is None:
            continue
        prev = base.get(host, {})
        old = prev.get(upstream) if prev.get("boot") == entry.get("boot") else None
        old = old or {"requests": 0, "errors_5xx": 0, "latency_buckets": [0] * len(cur["latency_buckets"])}
        requests += int(cur["requests"]) - int(old["requests"])
        errors += int(cur["errors_5xx"]) - int(old["errors_5xx"])
        diff = [int(a) - int(b) for a, b in zip(cur["latency_buckets"], old["latency_buckets"], strict=False)]
        bounds = [float(b) for b in entry.get("le", [])]
        buckets = diff if not buckets else [a + b for a, b in zip(buckets, diff, strict=False)]
    return requests, errors, bounds, buckets


class FleetSource:
    def __init__(self, fleet: FleetStatus) -> None:
        self.fleet = fleet

    def measure(self, service: str, upstreams: tuple[str, str], window: dict[str, Any] | None,
                spec: Analysis) -> tuple[tuple[Measurement, Measurement] | None, dict[str, Any]]:
        sample = _fleet_sample(self.fleet, service, upstreams)
        window = window or {}
        # Every host's last known boot id, also for hosts that were missing when the baseline was taken.
        known: dict[str, Any] = dict(window.get("boots") or {h: e.get("boot") for h, e in
                                                           window.get("sample", {}).items()})
        boots = {**known, **{h: e.get("boot") for h, e in sample.items()}}
        if "sample" not in window:
            return None, {"sample": sample, "boots": boots}
        base = dict(window["sample"])
        for host, entry in sample.items():
            # A host missing from the baseline: unless its boot changed (it restarted, so all its counts are
            # new), its counters so far belong to no window, so they become its baseline.
            if host not in base and (host not in known or known[host] == entry.get("boot")):
                base[host] = entry
        out = []
        for up in upstreams:
            requests, errors, bounds, buckets = _delta(sample, base, up)
            out.append(measurement_from_counters(requests, errors, bounds, buckets) if bounds
                       else Measurement(requests, None, None))
        canary, stable = out
        # Too few requests: keep the baseline so the window grows until it can be judged.
        keep = canary.requests is not None and canary.requests < max(spec.min_requests, 1)
        return (canary, stable), {"sample": base if keep else sample, "boots": boots}


def redact_url(url: str) -> str:
    """The URL without its user and password, for messages."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _host_port(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)


def parse_metrics_hosts(entries: Iterable[str]) -> frozenset[tuple[str, int | None]]:
    """--metrics-host values: HOST, HOST:PORT, [IPv6] or [IPv6]:PORT; UsageError naming the bad one."""
    out = set()
    for raw in entries:
        entry = raw.strip().lower()
        host, port = entry, ""
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else rest
        elif entry.count(":") == 1:
            host, port = entry.split(":")
        if not host or (port and not (is_decimal(port) and 0 < int(port) < 65536)):
            raise UsageError(f"--metrics-host: {raw!r} is not HOST or HOST:PORT")
        out.add((host, int(port) if port else None))
    return frozenset(out)


def check_metrics_host(url: str, allowed: frozenset[tuple[str, int | None]] | None) -> None:
    """UsageError for a link-local host, or one not on the allow-list (None: any host)."""
    if (refused := link_local_url(url)) is not None:
        raise UsageError(f"prometheus url {redact_url(url)}: {refused}")
    if allowed is None:
        return
    host, port = _host_port(url)
    if (host, port) not in allowed and (host, None) not in allowed:
        raise UsageError(f"prometheus url {redact_url(url)}: host {host}:{port} is not among the controller's "
                         "allowed metric hosts (rollout run --metrics-host)")


def _resolves_link_local(host: str, port: int) -> str | None:
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError:
        return None  # urlopen reports the failure
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        if address.is_link_local or (mapped is not None and mapped.is_link_local):
            return str(address)
    return None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect is an error: it could lead anywhere, the metadata service included


_OPENER = urllib.request.build_opener(_NoRedirects)


class PrometheusSource:
    def __init__(self, queries: PrometheusQueries, timeout: float = 5.0) -> None:
        self.queries = queries
        self.timeout = timeout

    def query(self, promql: str) -> float | None:
        """One instant query; the sum of a vector's values, a scalar's value, or None for no data/NaN."""
        url = self.queries.url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        where = redact_url(self.queries.url)
        if (address := _resolves_link_local(*_host_port(url))) is not None:
            raise StoreError(f"prometheus {where}: resolves to the link-local address {address}; refused")
        try:
            with _OPENER.open(url, timeout=self.timeout) as response:
                body = loads_json(response.read())
        except (OSError, ValueError) as exc:
            raise StoreError(f"prometheus {redact_url(self.queries.url)}: {exc}") from None
        return parse_query_result(body)

    def measure(self, service: str, upstreams: tuple[str, str], window: dict[str, Any] | None,
                spec: Analysis) -> tuple[tuple[Measurement, Measurement] | None, dict[str, Any]]:
        out = []
        for up in upstreams:
            def q(template: str | None, upstream: str = up) -> float | None:
                if template is None:
                    return None
                return self.query(fill_query(template, service, upstream, spec.interval))
            requests = q(self.queries.requests_query)
            p99 = q(self.queries.p99_query)
            out.append(Measurement(int(requests) if requests is not None else None, q(self.queries.error_rate_query),
                                   round(p99 * 1000, 3) if p99 is not None else None))
        return (out[0], out[1]), {}


def parse_query_result(body: Any) -> float | None:
    if not isinstance(body, dict) or body.get("status") != "success":
        error = body.get("error") if isinstance(body, dict) else None
        raise StoreError(f"prometheus query failed: {error or 'unexpected answer'}")
    data = body.get("data", {})
    kind, result = data.get("resultType"), data.get("result")
    values: list[float] = []
    if kind == "vector" and isinstance(result, list):
        values = [float(item["value"][1]) for item in result]
    elif kind == "scalar" and isinstance(result, list):
        values = [float(result[1])]
    else:
        raise StoreError(f"prometheus query: unsupported result type {kind!r}; use a vector or scalar query")
    values = [v for v in values if not math.isnan(v)]
    return sum(values) if values else None


def source_for(spec: Analysis, store: object) -> MetricsSource:
    if spec.prometheus is not None:
        return PrometheusSource(spec.prometheus)
    if not isinstance(store, FleetStatus):
        raise StoreError("this store keeps no fleet status: configure analysis.prometheus instead")
    return FleetSource(store)


def fill_query(template: str, service: str, upstream: str, interval: float) -> str:
    """A PromQL template with {{service}}, {{upstream}} and {{interval}} (whole seconds, at least 1s) filled in."""
    return (template.replace("{{service}}", service).replace("{{upstream}}", upstream)
            .replace("{{interval}}", f"{max(1, round(interval))}s"))
