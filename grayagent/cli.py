"""Command line: each verb parses its flags, calls one function, and prints the result.

The function is in grayagent.usecases for the store and state-dir verbs, grayagent.runtime.agentrun for the agent
service, and grayagent.rollout for rollouts. Text for humans is formatted here; decisions are made there.

Exit codes: 0 ok; 1 invalid input or a failed operation; 2 usage; 3 compare-and-set conflict.
Errors are one line each on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from grayagent import usecases
from grayagent.cli_options import OUTPUT, default_author, emit, open_url, pairs, service_logging, store_option
from grayagent.cli_rollout import rollout_group
from grayagent.errors import GrayagentError, InvalidDocument
from grayagent.rules.routing import Request
from grayagent.runtime.state import StateDir
from grayagent.stores import open_store, resolve_store_url

if TYPE_CHECKING:
    pass

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default=None, type=click.Choice(["debug", "info", "warning", "error"]),
              help="Default: info for the services (agent, rollout run), warning for the other commands.")
@click.version_option(package_name="grayagent")
@click.pass_context
def cli(ctx: click.Context, log_level: str | None) -> None:
    """Gray-release rules from a config store, rendered into nginx and Envoy.

    The manual ships with the package: `grayagent docs` lists its pages, `grayagent docs operations` shows one.
    """
    from grayagent.logsetup import configure

    ctx.meta["grayagent.log_level"] = log_level
    configure(log_level or "warning", json_output=False)  # commands: human lines; services switch below


@cli.command()
@click.argument("files", nargs=-1, required=True)
@OUTPUT
def validate(files: tuple[str, ...], output: str) -> None:
    """Check rule documents against the schema and the semantic rules."""
    problems = usecases.validate_files(files)
    if output == "json":
        click.echo(json.dumps({"valid": not problems, "problems": [p.__dict__ for p in problems]}))
    if problems:
        raise InvalidDocument(problems)
    if output == "text":
        for f in files:
            click.echo(f"{f}: valid")


@cli.command()
@click.argument("file")
@store_option()
@click.option("-m", "--message", default="", help="Why this version exists.")
@click.option("--author", default=default_author, help="Who publishes (default: user@host).")
@click.option("--expect-version", type=click.IntRange(min=0), default=None,
              help="Publish only if the current version is N (compare-and-set); default: the version read now.")
@click.option("--create", is_flag=True,
              help="Create the directory store, parents included, if it does not exist. Without it, publish "
                   "creates a new directory store only inside a parent directory that exists.")
@click.option("--check", "checks", type=click.Choice(["nginx", "envoy"]), multiple=True,
              help="Also run the proxy's own checker (nginx -t, envoy --mode validate) on the rendered "
                   "document before it becomes current. Repeatable.")
@click.option("--nginx-bin", default=None, help="nginx binary for --check nginx (default nginx).")
@click.option("--envoy-bin", default=None, help="envoy binary for --check envoy (default envoy).")
@OUTPUT
def publish(file: str, store_url: str | None, message: str, author: str, expect_version: int | None,
            create: bool, checks: tuple[str, ...], nginx_bin: str | None, envoy_bin: str | None,
            output: str) -> None:
    """Publish FILE as a new immutable version; prints its number."""
    store = open_store(resolve_store_url(store_url), publishing=True, create=create)
    binaries = {"nginx": nginx_bin, "envoy": envoy_bin}
    meta = usecases.publish(store, file, author, message, expect_version,
                            [(proxy, binaries[proxy]) for proxy in dict.fromkeys(checks)])
    emit(output, meta.as_dict(), str(meta.version))


@cli.command()
@store_option()
@click.option("--verify", is_flag=True, help="Check the whole history's hash chain instead of listing it; "
                                             "exit 1 naming the first broken version.")
@OUTPUT
def history(store_url: str | None, verify: bool, output: str) -> None:
    """List every version: number, time, author, message, digest, parent."""
    store = open_url(store_url)
    if verify:
        breaks = usecases.history_breaks(store)
        emit(output, {"intact": not breaks, "breaks": [{"version": b.version, "reason": b.reason} for b in breaks]},
              "\n".join(str(b) for b in breaks) if breaks else f"{store.url}: history intact")
        if breaks:
            sys.exit(1)
        return
    metas = usecases.history(store)
    if output == "json":
        click.echo(json.dumps([m.as_dict() for m in metas]))
        return
    if not metas:
        click.echo(f"{store.url}: nothing published yet")
        return
    click.echo(f"{'VERSION':>7}  {'CREATED':27}  {'PARENT':>6}  {'DIGEST':19}  {'AUTHOR':24}  MESSAGE")
    for m in metas:
        click.echo(f"{m.version:>7}  {m.created:27}  {m.parent:>6}  {m.digest[:19]:19}  {m.author[:24]:24}  "
                   f"{m.message}")


@cli.command()
@click.argument("version", type=click.IntRange(min=1), required=False)
@store_option()
@OUTPUT
def show(version: int | None, store_url: str | None, output: str) -> None:
    """Print the document of VERSION (default: the current one)."""
    record = usecases.show(open_url(store_url), version)
    if output == "json":
        click.echo(json.dumps({**record.meta.as_dict(), "content": record.content.decode("utf-8")},
                              ensure_ascii=False))
    else:
        click.echo(record.content.decode("utf-8"), nl=False)


@cli.command()
@click.argument("a", type=click.IntRange(min=1))
@click.argument("b", type=click.IntRange(min=1))
@store_option()
@OUTPUT
def diff(a: int, b: int, store_url: str | None, output: str) -> None:
    """Unified diff of two versions."""
    text = usecases.diff(open_url(store_url), a, b)
    emit(output, {"a": a, "b": b, "diff": text}, text.rstrip("\n"))


@cli.command()
@click.argument("version", type=click.IntRange(min=1))
@store_option()
@click.option("-m", "--message", default=None, help="Why (default: 'revert to version N').")
@click.option("--author", default=default_author, help="Who reverts (default: user@host).")
@OUTPUT
def revert(version: int, store_url: str | None, message: str | None, author: str, output: str) -> None:
    """Publish a NEW version whose content equals VERSION; prints its number."""
    meta = usecases.revert(open_url(store_url), version, author, message)
    emit(output, meta.as_dict(), str(meta.version))


@cli.command()
@store_option(required=False)
@click.option("--version", "version", type=click.IntRange(min=1), default=None, help="With --store: which version.")
@click.option("--file", "file", default=None, help="Route against a local (draft) document instead of the store.")
@click.option("--service", default=None, help="The service the request reaches.")
@click.option("--header", multiple=True, metavar="K=V")
@click.option("--cookie", multiple=True, metavar="K=V")
@click.option("--query", multiple=True, metavar="K=V")
@click.option("--path", default="/", show_default=True)
@click.option("--source-ip", default=None)
@click.option("--requests", "requests_file", default=None, metavar="FILE|-",
              help="Batch: JSON lines in, one JSON decision per line out.")
@OUTPUT
def route(store_url: str | None, version: int | None, file: str | None, service: str | None,
          header: tuple[str, ...], cookie: tuple[str, ...], query: tuple[str, ...], path: str,
          source_ip: str | None, requests_file: str | None, output: str) -> None:
    """Show which upstream a request goes to, and the rule that decided."""
    if file is not None and store_url is not None and "--store" in sys.argv:
        raise click.UsageError("give either --store or --file, not both")
    release = usecases.load_release(None if file else open_url(store_url), version, file)
    if requests_file is not None:
        stream = sys.stdin if requests_file == "-" else open(requests_file, encoding="utf-8")  # noqa: SIM115
        failed = False
        with stream:
            for answer in usecases.route_batch(release, stream, requests_file):
                failed |= "error" in answer
                click.echo(json.dumps(answer, ensure_ascii=False))
        if failed:
            sys.exit(1)
        return
    if service is None:
        raise click.UsageError("--service is required (or --requests for a batch)")
    request = Request.build(headers=pairs(header, "--header"), cookies=pairs(cookie, "--cookie"),
                            query=pairs(query, "--query"), path=path, source_ip=source_ip)
    decision = usecases.route_one(release, service, request)
    emit(output, decision.as_dict(), f"upstream={decision.upstream} rule={decision.rule or '-'} by={decision.by}"
         + (" set_cookie=yes" if decision.set_cookie else ""))  # a new anonymous-visitor ID (whenKeyMissing: cookie)


def _agent_flags() -> dict[str, Any]:
    """The agent options given on the command line (flags beat GRAYAGENT_* and the config file)."""
    ctx = click.get_current_context()
    return {name: value for name, value in ctx.params.items()
            if name not in ("config", "once") and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}


@cli.command()
@click.option("--config", "config", default=None, envvar="GRAYAGENT_CONFIG", metavar="FILE",
              help="YAML file whose keys mirror these flags (`grayagent docs agent-config`); SIGHUP re-reads it.")
@click.option("--store", default=None, help="Store URL [env: GRAYAGENT_STORE]")
@click.option("--target", type=click.Choice(["nginx", "envoy"]), default=None, help="Proxy to drive (default nginx).")
@click.option("--nginx-conf", default=None, help="The one file the agent owns; include it inside nginx's http {}.")
@click.option("--nginx-main-conf", default=None, help="nginx's main config, as the master runs it "
                                                       "(default /etc/nginx/nginx.conf).")
@click.option("--nginx-bin", default=None, help="nginx binary (default nginx).")
@click.option("--nginx-reuseport/--no-nginx-reuseport", default=None,
              help="Render listen ... reuseport, so several nginx on one host can share service ports.")
@click.option("--nginx-mode", type=click.Choice(["reload", "dynamic"]), default=None,
              help="reload (default): one reload per change. dynamic: needs lua-nginx-module; reloads only when "
                   "listen addresses, hosts or upstream servers change, and pushes rules and weights live.")
@click.option("--nginx-access-log", default=None, metavar="PATH",
              help="Render a JSON access log here and tail it for per-upstream figures (rollout analysis).")
@click.option("--status-interval", type=click.FloatRange(min=0.05), default=None,
              help="Seconds between fleet status reports, which carry the traffic figures (default 10).")
@click.option("--verify-listen", default=None,
              help="Loopback address of the version endpoint rendered into nginx (default 127.0.0.1:18089).")
@click.option("--envoy-dir", default=None, help="Envoy reads its lds/, cds/ and rds/ files from here "
                                                "(`grayagent docs envoy-bootstrap`).")
@click.option("--envoy-admin", default=None, help="Envoy's loopback admin URL (default http://127.0.0.1:9901).")
@click.option("--envoy-bin", default=None, help="envoy binary (default envoy).")
@click.option("--envoy-traffic-stats/--no-envoy-traffic-stats", default=None,
              help="Poll Envoy's per-cluster stats for per-upstream figures (rollout analysis).")
@click.option("--state-dir", default=None, help="Audit log, last-good cache and status live here.")
@click.option("--host", default=None, help="Name reported in fleet status (default: the hostname).")
@click.option("--status-listen", default=None, help="Address of /healthz and /metrics (default 127.0.0.1:9180).")
@click.option("--min-apply-interval", type=click.FloatRange(min=0), default=None,
              help="Seconds between applies; bursts of publishes coalesce into one apply (default 1).")
@click.option("--once", is_flag=True, help="Apply the current version once, print the health state, and exit: 0 "
                                           "healthy, stale (store unreachable, last-good kept) or pinned; 1 "
                                           "otherwise, including while nothing is published.")
def agent(config: str | None, once: bool, **_: Any) -> None:
    """Watch the store and keep the proxy on its current version."""
    from grayagent.runtime import agentrun

    flags = _agent_flags()
    options = agentrun.resolve_options(flags, config)
    if not once:
        service_logging()
    if once:
        serving, line = agentrun.run_once(options)
        click.echo(line)
        sys.exit(0 if serving else 1)
    agentrun.serve(options, lambda: agentrun.resolve_options(flags, config))


@cli.command(name="local-revert")
@click.argument("version", type=click.IntRange(min=1), required=False)
@click.option("--config", "config", default=None, envvar="GRAYAGENT_CONFIG", metavar="FILE",
              help="The agent's config file (its target and state dir are used).")
@click.option("--state-dir", default=None, help="The agent's state dir (overrides the config file).")
@click.option("--list", "list_versions", is_flag=True, help="List the versions cached on this host.")
@click.option("--unpin", is_flag=True, help="Let the agent follow the store again.")
@click.option("-m", "--message", default="break-glass local revert", help="Why (goes into the audit log).")
@OUTPUT
def local_revert(version: int | None, config: str | None, state_dir: str | None, list_versions: bool, unpin: bool,
                 message: str, output: str) -> None:
    """Break-glass: apply VERSION from this host's cache and pin it, without the store."""
    from grayagent.runtime import agentrun

    flags = {"state_dir": state_dir} if state_dir else {}
    options = agentrun.resolve_options(flags, config, need_target=version is not None)
    state = Path(str(options.state_dir))
    if list_versions:
        versions = usecases.local_versions(state, options.store)
        emit(output, versions, "\n".join(f"{v['version']:>7}  {v['created']:27}  {v['digest'][:19]}  "
                                           f"{'PINNED  ' if v['pinned'] else ''}{v['message']}" for v in versions)
              or f"no versions cached in {state}")
        return
    if unpin:
        released = usecases.unpin(state)
        emit(output, {"unpinned": released}, "unpinned: the agent follows the store again" if released
              else "nothing was pinned")
        return
    if version is None:
        raise click.UsageError("give a VERSION, or --list, or --unpin")
    pin = usecases.local_revert(state, agentrun.build_target(options), version, message, options.store)
    emit(output, pin, f"version {version} applied and pinned on this host; publish `grayagent revert {version}` "
                       "when the store is back, then `grayagent local-revert --unpin`")


@cli.command()
@store_option()
@click.option("--wait", "wait_seconds", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Block until every agent serves the current version, or the time runs out (exit 1).")
@click.option("--min-agents", type=click.IntRange(min=1), default=1, show_default=True,
              help="Converged needs at least this many agents reporting (agents that never reported are unseen).")
@OUTPUT
def status(store_url: str | None, wait_seconds: float | None, min_agents: int, output: str) -> None:
    """Every agent's applied version and health, and whether the fleet has converged (exit 0) or not (1)."""
    store = open_url(store_url)
    report = (usecases.wait_for_convergence(store, wait_seconds, min_agents) if wait_seconds is not None
              else usecases.fleet_status(store, min_agents))
    emit(output, report, _fleet_text(report))
    if not report["converged"]:
        sys.exit(1)


def _fleet_text(report: dict[str, Any]) -> str:
    """Each agent's health state (docs/operations.md, "Health") and why, in words."""
    count = len(report["agents"])
    version = report["current_version"]
    head = f"current version {version}" if version is not None else "nothing published yet"
    lines = [f"{head}: {count} agent{'' if count == 1 else 's'} reporting, "
             f"{'converged' if report['converged'] else 'NOT converged'}"]
    for agent in report["agents"]:
        state = agent.get("state") or ("healthy" if agent.get("healthy") else "unhealthy")  # older agents
        applied = agent.get("applied_version")
        host = str(agent.get("host") or "?")
        reason = agent.get("reason") or agent.get("last_error") or ""
        lines.append(f"  {host:30} {state:9} version {applied if applied is not None else '-':>6}"
                     f"{'  ' + reason if reason else ''}")
    return "\n".join(lines)


@cli.group(name="audit")
def audit_group() -> None:
    """Read and verify the agent's audit log."""


@audit_group.command(name="show")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@OUTPUT
def audit_show(state_dir: Path, output: str) -> None:
    """Print the audit entries."""
    for entry in usecases.audit_entries(state_dir):
        if output == "json":
            click.echo(json.dumps(entry, ensure_ascii=False))
        else:
            extra = f" error={entry['error']}" if entry.get("error") else ""
            extra += f" reason={entry['reason']}" if entry.get("reason") else ""
            steps = entry.get("steps_ms")
            # An edited log may hold anything here: print what is printable (`audit verify` flags the edit).
            timing = " " + " ".join(f"{k}={v:.1f}ms" for k, v in steps.items()
                                    if isinstance(v, int | float)) if isinstance(steps, dict) and steps else ""
            click.echo(f"{entry['seq']:>6} {entry.get('time', '-')} {entry.get('event', '-')!s:8} "
                       f"version={entry.get('version', '-')} result={entry.get('result', '-')}{timing}{extra}")


@audit_group.command(name="verify")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@OUTPUT
def audit_verify(state_dir: Path, output: str) -> None:
    """Check the hash chain; exit 1 if any entry was edited, removed or reordered."""
    problems = usecases.audit_verify(state_dir)
    emit(output, {"intact": not problems, "problems": problems},
          "\n".join(problems) if problems else f"{StateDir(state_dir).audit}: intact")
    if problems:
        sys.exit(1)


@audit_group.command(name="ack")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--reason", required=True, help="Why the gap is accepted (goes into the audit log).")
@click.option("--operator", default=default_author, help="Who acknowledges (default: user@host).")
@OUTPUT
def audit_ack(state_dir: Path, reason: str, operator: str, output: str) -> None:
    """Acknowledge every gap recorded in the log (an audited `ack` entry); exit 1 when there is none."""
    entry = usecases.audit_ack(state_dir, reason, operator)
    emit(output, entry, f"acknowledged gap(s) at seq {', '.join(str(g) for g in entry['gaps'])} "
                         f"with entry seq {entry['seq']}")


@cli.command(name="docs")
@click.argument("topic", required=False)
def docs_command(topic: str | None) -> None:
    """Print a page of the manual shipped with this install (README, operations, stores, ...); no TOPIC lists them."""
    from grayagent import docs

    if topic is None:
        for name in docs.SOURCES:
            click.echo(f"{name:18} {docs.title(name)}")
        return
    text = docs.read(topic)
    if sys.stdout.isatty():
        click.echo_via_pager(text)
    else:
        click.echo(text, nl=False)


cli.add_command(rollout_group)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="grayagent", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        hint = f"{ctx.command_path}: " if ctx is not None else "grayagent: "
        click.echo(f"{hint}{exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except InvalidDocument as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        sys.exit(exc.exit_code)
    except GrayagentError as exc:
        click.echo(f"grayagent: {exc}", err=True)
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        sys.exit(1)
    except OSError as exc:  # a full disk, a read-only store: one line naming the file, never a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"grayagent: {where}{exc.strerror or exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
