"""Running the agent as a service: options from flags, environment and a config file; sd_notify; SIGHUP.

Precedence for every option: command-line flag, then GRAYAGENT_<KEY>, then the config file, then the
default. SIGHUP re-reads the file: a valid new configuration replaces the running agent (the proxy keeps
serving throughout); an invalid one is logged and audited, and the old one stays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import math
import os
import signal
import socket
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import fastjsonschema
import jsonschema
import structlog

from grayagent.errors import GrayagentError, InvalidDocument, Problem, UsageError
from grayagent.rules.model import format_path, load_data
from grayagent.runtime import sdnotify
from grayagent.runtime.agent import Agent, AgentSettings
from grayagent.runtime.audit import AuditLog
from grayagent.runtime.cache import has_cache
from grayagent.runtime.observe import StatusServer
from grayagent.runtime.state import StateDir
from grayagent.stores import open_store, resolve_store_url
from grayagent.targets.base import Target
from grayagent.text import is_decimal

log = structlog.get_logger("grayagent.runtime.agentrun")


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
        raise InvalidDocument(_config_problems(path, data)) from None
    return dict(data)


YAML_BOOLEAN_HINT = ("YAML reads an unquoted yes, no, on, off, true or false as a boolean; "
                     "quote the value if you mean the word")


def _config_problems(path: str, data: Any) -> list[Problem]:
    """One problem per mistake, in words an operator can act on (no Python reprs)."""
    problems: list[Problem] = []
    for error in jsonschema.Draft7Validator(_config_schema()).iter_errors(data):
        if error.validator == "additionalProperties" and isinstance(data, dict):
            problems += [Problem(path, str(key), _unknown_key(str(key))) for key in data if key not in OPTION_KEYS]
            continue
        message = error.message
        wanted = error.schema if isinstance(error.schema, dict) else {}
        if isinstance(error.instance, bool) and (wanted.get("type") == "string" or "enum" in wanted):
            message = YAML_BOOLEAN_HINT
        problems.append(Problem(path, format_path(error.absolute_path), message))
    return problems


def _unknown_key(key: str) -> str:
    close = difflib.get_close_matches(key, OPTION_KEYS, n=1)
    return f"unknown key; did you mean {close[0]}?" if close else f"unknown key (known: {', '.join(OPTION_KEYS)})"


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


def _where(key: str) -> str:
    return f"{key} (--{key.replace('_', '-')}, GRAYAGENT_{key.upper()} or the config file)"


def _check_values(options: AgentOptions) -> None:
    """Values the flag types and the config schema let through: NaN and infinity pass every range check
    (and time.sleep(nan) raises), and a port must be ASCII digits in 0-65535 before anything binds it."""
    for key in ("min_apply_interval", "status_interval"):
        value = getattr(options, key)
        if not math.isfinite(value):
            raise UsageError(f"{_where(key)}: {value} is not a finite number of seconds")
    for key in ("status_listen", "verify_listen"):
        address: str = getattr(options, key)
        host, _, port = address.rpartition(":")
        if not host or not is_decimal(port) or int(port) > 65535:
            raise UsageError(f"{_where(key)}: {address!r} is not HOST:PORT with a port from 0 to 65535")


def resolve_options(flags: Mapping[str, Any], config_path: str | None,
                    environ: Mapping[str, str] = os.environ, need_target: bool = True) -> AgentOptions:
    """Merge the four sources; `flags` holds only the options given on the command line. Without
    `need_target` (commands that only read the state dir) the proxy's options may be missing."""
    merged: dict[str, Any] = load_config_file(config_path) if config_path else {}
    for key in OPTION_KEYS:
        env = environ.get(f"GRAYAGENT_{key.upper()}")
        if env is not None and env != "":
            merged[key] = _env_value(key, env)
    merged.update({k: v for k, v in flags.items() if v is not None})
    options = AgentOptions(**merged)
    _check_values(options)
    if not options.state_dir:
        raise UsageError("--state-dir is required (flag, GRAYAGENT_STATE_DIR, or state_dir in the config file)")
    if not need_target:
        return options
    if options.target == "nginx" and not options.nginx_conf:
        raise UsageError("--nginx-conf is required with --target nginx (flag, GRAYAGENT_NGINX_CONF, or nginx_conf "
                         "in the config file)")
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
                                         work_dir=StateDir(Path(options.state_dir or ".").absolute()).tmp_dir()))
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


def reserved_listens(options: AgentOptions) -> dict[str, str]:
    """The addresses the agent itself listens on, by the flag that sets them: no document may take them."""
    reserved = {"--status-listen": options.status_listen}
    if options.target == "nginx":
        reserved["--verify-listen"] = options.verify_listen
    elif options.target == "envoy":
        reserved["--envoy-admin"] = urllib.parse.urlsplit(options.envoy_admin).netloc
    return reserved


def build_agent(options: AgentOptions) -> Agent:
    assert options.state_dir is not None
    # First, so that a crash's leftovers go before the target takes its scratch space in tmp/.
    StateDir(options.state_dir).prepare()
    # A vanished directory store this host has cached versions of is served from the cache; an unknown one is
    # refused (a mistyped path).
    url = resolve_store_url(options.store)
    store = open_store(url, vanished_ok=has_cache(Path(options.state_dir), url))
    settings = AgentSettings(state_dir=Path(options.state_dir), min_apply_interval=options.min_apply_interval,
                             host=options.host, status_interval=options.status_interval,
                             reserved_listens=reserved_listens(options))
    return Agent(store, build_target(options), settings)


def run_once(options: AgentOptions) -> tuple[bool, str]:
    """One pass; whether the proxy now serves what it should (`Health.serving`), and a line saying the
    health state and why (docs/operations.md)."""
    agent = build_agent(options)
    try:
        agent.sync()
    finally:
        agent.store.close()
    health = agent.keeper.health
    return health.serving, f"{health.state.value}: {health.reason}"


def watchdog_ping() -> None:
    sdnotify.notify("WATCHDOG=1")


def start_status_server(listen: str, agent: Agent, token_file: str | None = None) -> StatusServer:
    def status() -> dict[str, Any]:
        agent.health()  # the same fresh assessment /healthz makes
        return agent.status.as_dict()

    try:
        token = Path(token_file).read_text("utf-8").strip() if token_file else None
    except OSError as exc:
        raise UsageError(f"status_token_file {token_file}: {exc.strerror or exc}") from None
    try:
        return StatusServer(listen, agent.metrics, agent.health, status, token=token or None).start()
    except OSError as exc:
        raise UsageError(f"status_listen {listen} (--status-listen, GRAYAGENT_STATUS_LISTEN or the config "
                         f"file): {exc.strerror or exc}") from None


def _start(options: AgentOptions) -> tuple[Agent, StatusServer]:
    agent = build_agent(options)
    try:
        return agent, start_status_server(options.status_listen, agent, options.status_token_file)
    except BaseException:
        agent.store.close()  # a reload that cannot start must not leak the new store's connection
        raise


def _refuse_config(state_dir: str | None, exc: Exception, message: str) -> None:
    """Log and audit a configuration that was not taken; the running one stays."""
    reason = str(exc).replace("\n", "; ")
    log.error(message, error=reason)
    with contextlib.suppress(OSError):
        AuditLog(StateDir(str(state_dir)).root).append("config-refused", error=reason)


def _run_until_signal(agent: Agent, stop: threading.Event, reload_requested: threading.Event,
                      ready: Callable[[], None]) -> None:
    """Run the agent until SIGTERM/SIGINT (`stop`) or SIGHUP (`reload_requested`)."""
    run_stop = threading.Event()

    def relay() -> None:
        while not run_stop.is_set():
            if stop.wait(0.2) or reload_requested.is_set():
                run_stop.set()

    threading.Thread(target=relay, name="signal-relay", daemon=True).start()
    agent.run(run_stop, ready=ready, heartbeat=watchdog_ping)


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
            agent, server = _start(options)
        except (GrayagentError, OSError) as exc:
            if running is None:
                raise  # the first start: fail loudly, systemd shows the one-line error
            # A reloaded configuration that validates but cannot start (an address in use, a refused URL):
            # keep the one that was running, as an invalid file is kept.
            _refuse_config(running.state_dir, exc, "new configuration could not start; keeping the running one")
            options, running = running, None
            continue
        running = options

        def ready(a: Agent = agent) -> None:
            nonlocal notified_ready
            if not notified_ready:
                sdnotify.notify(f"READY=1\nSTATUS={a.status.state}: {a.status.reason}")
                notified_ready = True

        try:
            _run_until_signal(agent, stop, reload_requested, ready)
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
            _refuse_config(options.state_dir, exc, "configuration refused; keeping the running one")
        sdnotify.notify("READY=1")
