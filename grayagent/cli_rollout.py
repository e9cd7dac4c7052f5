"""`grayagent rollout ...`: the controller service and the requests to it, and rollout status for humans."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from grayagent.cli_options import OUTPUT, emit, open_url, service_logging, store_option

if TYPE_CHECKING:
    from grayagent.rollout.record import RolloutRecord
    from grayagent.rollout.usecases import Plan


@click.group(name="rollout")
def rollout_group() -> None:
    """Progressive rollouts: ramp a canary step by step, judged by its traffic (`grayagent docs rollout`)."""


@rollout_group.command(name="run")
@store_option()
@click.option("--interval", type=click.FloatRange(min=0.05), default=2.0, show_default=True,
              help="Seconds between controller ticks.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep a hash-chained audit log of the controller's publishes here.")
@click.option("--metrics-host", "metrics_hosts", multiple=True, envvar="GRAYAGENT_METRICS_HOSTS", metavar="HOST[:PORT]",
              help="Query only these Prometheus hosts (repeat; default: any host that is not link-local) "
                   "[env: GRAYAGENT_METRICS_HOSTS, space-separated].")
def rollout_run(store_url: str | None, interval: float, state_dir: Path | None, metrics_hosts: tuple[str, ...]) -> None:
    """The controller: long-running; several may run, one leads (lock or lease)."""
    from grayagent.rollout import service
    from grayagent.rollout.sources import parse_metrics_hosts

    allowed = parse_metrics_hosts(metrics_hosts) if metrics_hosts else None
    service_logging()
    service.serve(open_url(store_url), interval, state_dir, allowed)


@rollout_group.command(name="start")
@click.argument("service")
@store_option()
@click.option("--force", is_flag=True, help="Start although the pre-flight check fails; needs --reason.")
@click.option("--reason", default=None, metavar="TEXT",
              help="Why a failed pre-flight is overridden (with --force); kept in the rollout record's events and "
                   "the controller's audit log.")
@OUTPUT
def rollout_start(service: str, store_url: str | None, force: bool, reason: str | None, output: str) -> None:
    """Begin the rollout that SERVICE's rollout section in the current version defines.

    The pre-flight checklist (`grayagent rollout check`) runs first; a failure refuses the start (exit 7,
    nothing written) unless --force --reason TEXT.
    """
    from grayagent.cli_options import default_author
    from grayagent.errors import UsageError
    from grayagent.rollout import usecases as rollout

    if force != (reason is not None) or (reason is not None and not reason.strip()):
        raise UsageError("--force and --reason TEXT go together: give both to start past a failed pre-flight")
    try:
        rec = rollout.start(open_url(store_url), service, check=True, force_reason=reason.strip() if reason else None,
                            operator=default_author())
    except rollout.PreflightFailed as exc:
        emit(output, {"started": False, "failed": [i.as_dict() for i in exc.failed]},
             "\n".join(i.line() for i in exc.failed))
        raise
    forced = "\n".join(rec.forced["failed"]) + "\n" if rec.forced else ""
    emit(output, rec.to_json(), f"{forced}{rec.events[-1]['message']} ({len(rec.steps)} steps); "
                                 "the controller publishes them")


@rollout_group.command(name="check")
@click.argument("service")
@store_option()
@OUTPUT
def rollout_check(service: str, store_url: str | None, output: str) -> None:
    """The pre-flight checklist that `rollout start` runs: one line per item, ok or FAIL with the reason.

    Every metric query answers now, the rollback target exists and validates, the release window is open,
    and every agent is healthy on the current version. Exit 0 when all pass, 7 otherwise.
    """
    from grayagent.rollout import usecases as rollout

    items = rollout.check(open_url(store_url), service)
    ok = all(i.ok for i in items)
    emit(output, {"service": service, "ok": ok, "items": [i.as_dict() for i in items]},
         "\n".join(i.line() for i in items))
    if not ok:
        sys.exit(rollout.PreflightFailed.exit_code)  # the same code as a refused `rollout start`


# `rollout status --watch` exit codes once every rollout shown has ended (docs/rollout.md).
ROLLOUT_EXIT = {"succeeded": 0, "rolled-back": 4, "aborted": 5}


def human_duration(seconds: float) -> str:
    """4m12s, 2h, 1h30m, 45s: whole seconds, the largest units first, zero units left out."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts) or "0s"


def _step_text(text: str) -> str:
    """A step as recorded ("pause 300s") with a human duration ("pause 5m")."""
    seconds = text[6:-1]
    if text.startswith("pause ") and text.endswith("s") and seconds.isascii() and seconds.replace(".", "", 1).isdigit():
        return f"pause {human_duration(float(seconds))}"
    return text


def _figures(measured: Any) -> str:
    """requests, 5xx share and p99 of one analysis entry's measurement; unknown figures are left out."""
    if not isinstance(measured, dict):
        return ""
    parts = []
    if isinstance(measured.get("requests"), int):
        parts.append(f"requests {measured['requests']}")
    if isinstance(measured.get("error_rate"), int | float):
        parts.append(f"5xx {measured['error_rate'] * 100:.2f}%")
    if isinstance(measured.get("p99_ms"), int | float):
        parts.append(f"p99 {measured['p99_ms']:.1f}ms")
    return "  ".join(parts)


def format_rollout_status(rec: RolloutRecord, now: float) -> str:
    """A RolloutRecord for people: the steps with a marker, the weight, the time, each recent analysis.

    The clock stops when the rollout ends (it shows the rollout's whole run), and nothing shows None.
    """
    from grayagent.rollout.record import pct

    head = [f"rollout {rec.service}: {rec.phase}", f"canary {rec.canary} at {pct(rec.weight)}"
            + (f" + audiences {', '.join(rec.audiences)}" if rec.audiences else ""),
            f"failures {rec.failures}/{rec.failure_limit + 1}"]
    if rec.started_at is None:
        head.append("not started by a controller yet")
    else:
        end = rec.finished_at if rec.ended and rec.finished_at is not None else now
        took = human_duration(max(0.0, end - rec.started_at))
        limit = f" of max {human_duration(rec.max_duration)}" if rec.max_duration else ""
        head.append(f"{'ran' if rec.ended else 'running'} {took}{limit}")
    head.append(f"(from version {rec.base_version})")
    lines = ["  ".join(head)]
    if rec.reason:
        lines.append(f"  reason: {rec.reason}")
    pending = [name for name, wanted in rec.requests.items() if wanted]
    if pending and not rec.ended:
        lines.append(f"  requested: {', '.join(pending)}")
    for i, text in enumerate(rec.steps):
        mark = "done" if i < rec.step else ("  ->" if i == rec.step and not rec.ended else "")
        lines.append(f"  {mark:>4} {i + 1:>2}. {_step_text(text)}")
    for entry in rec.analyses[-5:]:
        reasons = "; ".join(str(r) for r in entry.get("reasons") or [])
        lines.append(f"  analysis {entry.get('result', '?')!s:12} {_figures(entry.get('canary'))}  {reasons}"
                     .rstrip())
    return "\n".join(lines)


def _terminal_rows(text: str) -> int:
    import shutil

    columns = max(1, shutil.get_terminal_size().columns)
    return sum(max(1, -(-len(line) // columns)) for line in text.split("\n"))


@rollout_group.command(name="status")
@click.argument("service", required=False)
@store_option()
@click.option("--watch", is_flag=True, help="Follow until every rollout shown has ended: redraws in place on a "
                                            "terminal, prints each change otherwise. Exit 0 when all succeeded, "
                                            "4 when one rolled back, 5 when one was aborted.")
@OUTPUT
def rollout_status(service: str | None, store_url: str | None, watch: bool, output: str) -> None:
    """Steps, current weight and each analysis result of SERVICE's rollout (default: every rollout).

    Exits 6 when no rollout has been started.
    """
    from grayagent.rollout import usecases as rollout

    store = open_url(store_url)
    redraw = watch and output == "text" and sys.stdout.isatty()
    shown, rows = "", 0
    records: list[RolloutRecord] = []
    for records, now in rollout.status_stream(store, service, watch):
        windows = [None if r.ended else rollout.window(store, r.service, now) for r in records]
        data = [{**r.to_json(), **({"release_window": w} if w else {})} for r, w in zip(records, windows, strict=True)]
        if output == "json":
            frame = json.dumps(data, ensure_ascii=False)
            changed = frame != shown
        else:
            frame = "\n\n".join(format_rollout_status(r, now) + (f"\n  window: {w['text']}" if w else "")
                                  for r, w in zip(records, windows, strict=True))
            # Without a terminal, print a frame only when the records changed, not at every clock tick.
            changed = redraw or json.dumps(data, sort_keys=True) != shown
        if not changed:
            continue
        if redraw and rows:
            click.echo(f"\x1b[{rows}F\x1b[J", nl=False)  # back to the previous frame's first line, erase it
        elif watch and shown and output == "text":
            click.echo("")
        click.echo(frame)
        shown = frame if output == "json" else json.dumps(data, sort_keys=True)
        rows = _terminal_rows(frame) if redraw else 0
    if watch:  # every rollout shown has ended
        phases = {r.phase for r in records}
        sys.exit(ROLLOUT_EXIT["rolled-back"] if "rolled-back" in phases
                 else ROLLOUT_EXIT["aborted"] if "aborted" in phases else 0)


def _rollout_request(action: str) -> Callable[..., None]:
    @click.argument("service")
    @store_option()
    @OUTPUT
    def command(service: str, store_url: str | None, output: str) -> None:
        from grayagent.rollout import usecases as rollout

        rec = rollout.request(open_url(store_url), service, action)
        emit(output, rec.to_json(), f"rollout {service}: {action} requested; the controller acts on its next tick")

    command.__doc__ = controller_help[action]
    return command


controller_help = {
    "pause": "Hold SERVICE's rollout at its current step (analysis and maxDuration keep running).",
    "resume": "Continue a paused rollout.",
    "promote": "Pass the current pause or manual gate now.",
    "abort": "Stop and roll back as onFailure says (revert, or canary weight 0).",
}
for _action in controller_help:
    rollout_group.command(name=_action)(_rollout_request(_action))


def format_plan(plan: Plan) -> str:
    """The timeline of `rollout plan` as an aligned table, one line per step."""
    from grayagent.rollout.record import pct

    head = (f"rollout {plan.service}: canary {plan.canary!r}, stable {plan.stable!r}; the canary starts at "
            f"{pct(plan.weight)}")
    rows = [("step", "stage", "adds", "canary", "audiences", "pause", "checks")]
    for s in plan.steps:
        pause = "manual" if s.pause == "manual" else human_duration(s.pause) if isinstance(s.pause, float) else "-"
        rows.append((str(s.step), str(s.stage) if s.stage is not None else "-", ", ".join(s.adds) or "-",
                     pct(s.weight), ", ".join(s.audiences) or "-", pause,
                     ", ".join(s.checks) or ("- (then the rollout has succeeded)" if s.last
                                             else "- (the canary serves no one)" if not (s.weight or s.audiences)
                                             else "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = (0, 1, 3)  # numbers align right
    lines = ["  ".join(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(r))
             .rstrip() for r in rows]
    return "\n".join([head, *lines])


@rollout_group.command(name="plan")
@click.argument("file")
@click.argument("service")
@click.option("--stage", type=int, default=None, metavar="K",
              help="Print the complete document the K-th routing step publishes (1-based; pauses are not counted), "
                   "as YAML (with -o json: as JSON).")
@OUTPUT
def rollout_plan(file: str, service: str, stage: int | None, output: str) -> None:
    """The timeline of SERVICE's rollout in FILE: each step's audiences, canary weight, pause and checks.

    Needs no store: review and diff every stage before `rollout start`.
    """
    import yaml

    from grayagent.rollout import usecases as rollout
    from grayagent.rules.model import load_data

    if stage is not None:
        data = load_data(rollout.plan_stage(file, service, stage), file)
        click.echo(json.dumps(data, ensure_ascii=False, indent=1) if output == "json"
                   else yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip("\n"))
        return
    plan = rollout.plan(file, service)
    emit(output, plan.as_dict(), format_plan(plan))
