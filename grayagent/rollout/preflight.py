"""The pre-flight checklist behind `grayagent rollout check`, which `rollout start` runs first.

One Item per line, each ok or FAIL with its reason:
- metrics: every query the analysis makes answers now (`metric_probes`: one probe per query, canary and
  stable; an empty answer counts, an error does not);
- rollback: the version a rollback would publish exists and validates (revert: that version, with its
  history chain intact; zero: the current version with the canary at 0);
- window: the release windows are open now, or when they open;
- fleet: at least one agent reports, and every agent is healthy and serves the current version
  (runtime/fleet.py, the same figures as `grayagent status`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from grayagent.errors import GrayagentError, InvalidDocument
from grayagent.rollout import windows
from grayagent.rollout.document import set_canary_weight
from grayagent.rollout.record import RolloutRecord
from grayagent.rollout.sources import PrometheusSource, fill_query, redact_url
from grayagent.rules.model import Rollout, parse_document
from grayagent.runtime.fleet import fleet_status
from grayagent.stores.base import FleetStatus, Store, VersionRecord
from grayagent.stores.chain import require_intact

# A probe asks one metric source now: a short description of the answer, or GrayagentError when it cannot.
Probe = tuple[str, Callable[[], str]]


@dataclass(frozen=True, slots=True)
class Item:
    item: str        # metrics, rollback, window, fleet
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'FAIL':4}  {self.item}: {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _prometheus_probe(source: PrometheusSource, promql: str) -> Callable[[], str]:
    def probe() -> str:
        value = source.query(promql)
        return "answers (no data yet)" if value is None else f"answers {value:g}"
    return probe


def _fleet_figures_probe(store: Store) -> Callable[[], str]:
    def probe() -> str:
        if not isinstance(store, FleetStatus):
            raise GrayagentError("this store keeps no fleet status: configure analysis.prometheus")
        agents = store.fleet()
        counting = [a for a in agents if isinstance(a.get("traffic"), dict)]
        if not counting:
            who = f"none of the {len(agents)} reporting agents sends" if agents else "no agent reports, so none sends"
            raise GrayagentError(f"{who} traffic figures (agent option nginx_access_log or envoy_traffic_stats), "
                                 "so the analysis could never judge")
        return f"{len(counting)} of {len(agents)} agents send traffic figures"
    return probe


def metric_probes(spec: Rollout, store: Store, service: str) -> list[Probe]:
    """Every query the rollout's analysis makes, ready to ask now. New metric sources add theirs here."""
    analysis = spec.analysis
    if analysis is None:
        return []
    if analysis.prometheus is None:
        return [("agents' traffic figures", _fleet_figures_probe(store))]
    queries = analysis.prometheus
    source = PrometheusSource(queries)
    out: list[Probe] = []
    for upstream in (spec.canary, spec.stable):
        for name, template in (("errorRateQuery", queries.error_rate_query), ("p99Query", queries.p99_query),
                               ("requestsQuery", queries.requests_query)):
            if template is not None:
                promql = fill_query(template, service, upstream, analysis.interval)
                out.append((f"{name} for {upstream} at {redact_url(queries.url)}", _prometheus_probe(source, promql)))
    return out


def metric_items(spec: Rollout, store: Store, service: str) -> list[Item]:
    probes = metric_probes(spec, store, service)
    if not probes:
        return [Item("metrics", True, "no analysis configured: nothing to query")]
    items = []
    for label, probe in probes:
        try:
            items.append(Item("metrics", True, f"{label}: {probe()}"))
        except GrayagentError as exc:
            items.append(Item("metrics", False, f"{label}: {_first_line(exc)}"))
    return items


def rollback_item(store: Store, current: VersionRecord, spec: Rollout, service: str,
                  running: RolloutRecord | None) -> Item:
    """What `onFailure` would publish: revert, the version from before the rollout (the current one at start);
    zero, the current version with the canary at 0."""
    if spec.on_failure == "zero":
        try:
            set_canary_weight(current.content, f"{store.url}#{current.version}", service, spec.canary, spec.stable, 0)
        except GrayagentError as exc:
            return Item("rollback", False, f"onFailure zero: {_first_line(exc)}")
        return Item("rollback", True, f"onFailure zero: version {current.version} with {spec.canary} at 0% validates")
    version = running.base_version if running is not None else current.version
    try:
        record = require_intact(store, version)
        parse_document(record.content, f"{store.url}#{version}").service(service)
    except KeyError:
        return Item("rollback", False, f"onFailure revert: version {version} has no service {service!r}")
    except InvalidDocument as exc:
        return Item("rollback", False, f"onFailure revert: {exc.problems[0]}")
    except GrayagentError as exc:
        return Item("rollback", False, f"onFailure revert: version {version}: {_first_line(exc)}")
    return Item("rollback", True, f"onFailure revert: version {version} exists, validates, and its history chain "
                                  "is intact")


def window_item(spec: Rollout, now: float) -> Item:
    return Item("window", windows.is_open(spec.windows, now), windows.describe(spec.windows, now))


def fleet_item(store: Store) -> Item:
    try:
        report = fleet_status(store)
    except GrayagentError as exc:
        return Item("fleet", False, _first_line(exc))
    agents, version = report["agents"], report["current_version"]
    if not agents:
        return Item("fleet", False, "no agent reports to this store (are the agents running against it?)")
    behind = []
    for agent in agents:
        state = agent.get("state") or ("healthy" if agent.get("healthy") else "unhealthy")
        applied = agent.get("applied_version")
        if agent.get("healthy") and applied == version:
            continue
        reason = agent.get("reason") or agent.get("last_error")
        behind.append(f"{agent.get('host') or '?'} {state} on version {applied if applied is not None else '-'}"
                      + (f" ({reason})" if reason else ""))
    if behind:
        return Item("fleet", False, f"{len(behind)} of {len(agents)} agents not healthy on version {version}: "
                                    + "; ".join(behind))
    return Item("fleet", True, f"{len(agents)} agent{'' if len(agents) == 1 else 's'} healthy on version {version}")


def checklist(store: Store, current: VersionRecord, spec: Rollout, service: str, now: float,
              running: RolloutRecord | None = None) -> list[Item]:
    """Every item, in order: metrics, rollback, window, fleet. `running`: a rollout in progress, whose
    revert target is its own base version."""
    return [*metric_items(spec, store, service), rollback_item(store, current, spec, service, running),
            window_item(spec, now), fleet_item(store)]


def failures(items: list[Item]) -> list[Item]:
    return [i for i in items if not i.ok]
