"""Running the agent as a service: options from flags, environment and a config file; sd_notify; SIGHUP.

Precedence for every option: command-line flag, then GRAYAGENT_<KEY>, then the config file, then the
default. SIGHUP re-reads the file: a valid new configuration replaces the running agent (the proxy keeps
serving throughout); an invalid one is logged and audited, and the old one stays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import fastjsonschema
import jsonschema
import structlog

from grayagent import sdnotify
from grayagent.agent import Agent, AgentSettings
from grayagent.audit import AuditLog
from grayagent.errors import GrayagentError, InvalidDocument, Problem, UsageError
from grayagent.model import format_path, load_data
from grayagent.observe import StatusServer
from grayagent.stores import open_store, resolve_store_url
from grayagent.targets.base import Target

log = structlog.get_logger("grayagent.agentrun")


@dataclass(frozen=True)
class AgentOptions:
    store: str | None = None
    target: str = "nginx"
    state_dir: str | None = None
    host: str = field(default_factory=socket.gethostname)
    min_apply_interval: float = 1.0
    status_listen: str = "127.0.0.1:9180"
    status_token_file: str | None = None  # bearer token for /status and /metrics (one line; never logged)
    log_level: str = "info"
    nginx_conf: str | None = None
    nginx_main_conf: str = "/etc/nginx/nginx.conf"
    nginx_bin: str = "nginx"
    nginx_reuseport: bool = False
    nginx_mode: str = "reload"  # reload: render maps, reload per change; dynamic: Lua, reload on topology only
    nginx_access_log: str | None = None
    status_interval: float = 10.0
    verify_listen: str = "127.0.0.1:18089"
    envoy_dir: str | None = None
    envoy_admin: str = "http://127.0.0.1:9901"
    envoy_bin: str = "envoy"
    envoy_traffic_stats: bool = False


OPTION_KEYS = tuple(f.name for f in dataclasses.fields(AgentOptions))


@functools.cache
def _config_schema() -> dict[str, Any]:
    text = resources.files("grayagent").joinpath("schema/agent-config.schema.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def load_config_file(path: str) -> dict[str, Any]:
    """The config file's keys, validated; raises InvalidDocument naming the file and the key."""
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidDocument([Problem(path, "", exc.strerror or str(exc))]) from None
    data = load_data(content, path)
    if data is None:
        return {}
    try:
        fastjsonschema.validate(_config_schema(), data)
    except fastjsonschema.JsonSchemaException:
        validator = jsonschema.Draft7Validator(_config_schema())
        problems = [Problem(path, format_path(e.absolute_path), e.message if e.validator != "additionalProperties"
                            else f"unknown key (known: {', '.join(OPTION_KEYS)})")
                    for e in validator.iter_errors(data)]
        raise InvalidDocument(problems) from None
    return dict(data)


def _env_value(key: str, raw: str) -> Any:
    kind = {f.name: f.type for f in dataclasses.fields(AgentOptions)}[key]
    if "float" in str(kind):
        try:
            return float(raw)
        except ValueError:
            raise UsageError(f"GRAYAGENT_{key.upper()}: {raw!r} is not a number") from None
    if "bool" in str(kind):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return raw


def resolve_options(flags: Mapping[str, Any], config_path: str | None,
                    environ: Mapping[str, str] = os.environ) -> AgentOptions:
    """Merge the four sources; `flags` holds only the options given on the command line."""
    merged: dict[str, Any] = load_config_file(config_path) if config_path else {}
    for key in OPTION_KEYS:
        env = environ.get(f"GRAYAGENT_{key.upper()}")
        if env is not None and env != "":
            merged[key] = _env_value(key, env)
    merged.update({k: v for k, v in flags.items() if v is not None})
    options = AgentOptions(**merged)
    if not options.state_dir:
        raise UsageError("--state-dir is required (flag, GRAYAGENT_STATE_DIR, or state_dir in the config file)")
    if options.target == "nginx" and not options.nginx_conf:
        raise UsageError("--nginx-conf is required with --target nginx")
    if options.nginx_mode not in ("reload", "dynamic"):
        raise UsageError(f"--nginx-mode {options.nginx_mode}: use reload or dynamic")
    if options.target == "envoy" and not options.envoy_dir:
        raise UsageError("--envoy-dir is required with --target envoy")
    return options


def build_target(options: AgentOptions) -> Target:
    if options.target == "envoy":
        from grayagent.targets.envoy import EnvoySettings, EnvoyTarget

        assert options.envoy_dir is not None
        return EnvoyTarget(EnvoySettings(envoy_dir=Path(options.envoy_dir).absolute(), admin_url=options.envoy_admin,
                                         binary=options.envoy_bin, traffic_stats=options.envoy_traffic_stats,
                                         work_dir=Path(options.state_dir or ".").absolute() / "tmp"))
    assert options.nginx_conf is not None
    if options.nginx_mode == "dynamic":
        from grayagent.targets.nginx_dynamic import NginxDynamicSettings, NginxDynamicTarget

        return NginxDynamicTarget(NginxDynamicSettings(
            conf=Path(options.nginx_conf).absolute(), main_conf=Path(options.nginx_main_conf),
            binary=options.nginx_bin, control_listen=options.verify_listen, reuseport=options.nginx_reuseport,
            access_log=Path(options.nginx_access_log) if options.nginx_access_log else None))
    from grayagent.targets.nginx import NginxSettings, NginxTarget

    return NginxTarget(NginxSettings(conf=Path(options.nginx_conf).absolute(), main_conf=Path(options.nginx_main_conf),
                                     binary=options.nginx_bin, verify_listen=options.verify_listen,
                                     reuseport=options.nginx_reuseport,
                                     access_log=Path(options.nginx_access_log) if options.nginx_access_log else None))


def build_agent(options: AgentOptions) -> Agent:
    assert options.state_dir is not None
    store = open_store(resolve_store_url(options.store))
    settings = AgentSettings(state_dir=Path(options.state_dir), min_apply_interval=options.min_apply_interval,
                             host=options.host, status_interval=options.status_interval)
    return Agent(store, build_target(options), settings)


def run_once(options: AgentOptions) -> bool:
    agent = build_agent(options)
    try:
        return agent.sync()
    finally:
        agent.store.close()


def watchdog_ping() -> None:
    sdnotify.notify("WATCHDOG=1")


def start_status_server(listen: str, agent: Agent, token_file: str | None = None) -> StatusServer:
    def status() -> dict[str, Any]:
        return agent.status.as_dict()

    try:
        token = Path(token_file).read_text("utf-8").strip() if token_file else None
    except OSError as exc:
        raise UsageError(f"status_token_file {token_file}: {exc.strerror or exc}") from None
    try:
        return StatusServer(listen, agent.metrics, agent.health, status, token=token or None).start()
    except OSError as exc:
        raise UsageError(f"--status-listen {listen}: {exc.strerror or exc}") from None


def serve(options: AgentOptions, reload_options: Callable[[], AgentOptions]) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP re-reads the configuration through `reload_options`."""
    stop = threading.Event()
    reload_requested = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
    notified_ready = False

    running: AgentOptions | None = None  # the configuration that last started successfully
    while True:
        try:
            agent = build_agent(options)
            server = start_status_server(options.status_listen, agent, options.status_token_file)
        except (GrayagentError, OSError) as exc:
            if running is None:
                raise  # the first start: fail loudly, systemd shows the one-line error
            # A reloaded configuration that validates but cannot start (an address in use, a refused URL):
            # keep the one that was running, as an invalid file is kept.
            reason = str(exc).replace("\n", "; ")
            log.error("new configuration could not start; keeping the running one", error=reason)
            with contextlib.suppress(OSError):
                AuditLog(Path(str(running.state_dir))).append("config-refused", error=reason)
            options, running = running, None
            continue
        running = options
        run_stop = threading.Event()

        def ready(a: Agent = agent) -> None:
            nonlocal notified_ready
            if not notified_ready:
                sdnotify.notify(f"READY=1\nSTATUS=serving version {a.status.applied_version}")
                notified_ready = True

        def relay(run_stop: threading.Event = run_stop) -> None:
            while not run_stop.is_set():
                if stop.wait(0.2) or reload_requested.is_set():
                    run_stop.set()

        relayer = threading.Thread(target=relay, name="signal-relay", daemon=True)
        relayer.start()
        try:
            agent.run(run_stop, ready=ready, heartbeat=watchdog_ping)
        finally:
            server.stop()
            agent.store.close()
        if stop.is_set():
            sdnotify.notify("STOPPING=1")
            return
        reload_requested.clear()
        sdnotify.notify("RELOADING=1")
        try:
            options = reload_options()
            log.info("configuration reloaded")
        except (InvalidDocument, UsageError) as exc:
            with contextlib.suppress(OSError):
                agent.audit.append("config-refused", error=str(exc).replace("\n", "; "))
            log.error("configuration refused; keeping the running one", error=str(exc).replace("\n", "; "))
        sdnotify.notify("READY=1")


def local_versions(options: AgentOptions) -> list[dict[str, Any]]:
    """What a break-glass revert can restore: the versions this host applied recently."""
    from grayagent.agent import cached_versions, read_pin

    assert options.state_dir is not None
    pin = read_pin(Path(options.state_dir))
    return [{**r.meta.as_dict(), "pinned": bool(pin and pin.get("version") == r.version)}
            for r in cached_versions(Path(options.state_dir))]


def local_revert(options: AgentOptions, version: int, reason: str) -> dict[str, Any]:
    """Break-glass: apply a version from this host's cache straight to the proxy and pin it.

    For when the store is down or serving a bad version. The pin stops the agent from applying store
    versions until `unpin`; publish a proper `grayagent revert` once the store is back, then unpin.
    """
    from grayagent.agent import PIN_FILE, cached_versions
    from grayagent.audit import AuditLog
    from grayagent.fsutil import atomic_write
    from grayagent.model import parse_document

    assert options.state_dir is not None
    state = Path(options.state_dir)
    records = {r.version: r for r in cached_versions(state)}
    if version not in records:
        known = ", ".join(map(str, sorted(records))) or "none"
        raise UsageError(f"version {version} is not in {state / 'cache'} (cached: {known})")
    record = records[version]
    digest = record.meta.digest
    release = parse_document(record.content, f"{state / 'cache'}#{version}")
    target = build_target(options)
    pin = {"version": version, "digest": digest, "reason": reason, "pinned_by": "grayagent local-revert"}
    previous_pin = (state / PIN_FILE).read_bytes() if (state / PIN_FILE).exists() else None
    atomic_write(state / PIN_FILE, json.dumps(pin).encode())  # first, so a running agent cannot interleave
    result = target.apply(target.render(release, version, digest), version, digest)
    AuditLog(state).append("break-glass", version=version, digest=digest, target=target.name, reason=reason,
                           result="ok" if result.ok else "failed", steps_ms=result.steps_ms, error=result.error)
    if not result.ok:
        if previous_pin is None:
            (state / PIN_FILE).unlink(missing_ok=True)
        else:
            atomic_write(state / PIN_FILE, previous_pin)
        raise UsageError(f"local revert to version {version} failed: {result.error}")
    return pin


def unpin(options: AgentOptions) -> bool:
    from grayagent.agent import PIN_FILE
    from grayagent.audit import AuditLog

    assert options.state_dir is not None
    state = Path(options.state_dir)
    if not (state / PIN_FILE).exists():
        return False
    (state / PIN_FILE).unlink()
    AuditLog(state).append("unpin")
    return True
