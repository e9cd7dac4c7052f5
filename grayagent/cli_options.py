"""What every CLI verb shares: the --output and --store options, printing a result, the default author."""

from __future__ import annotations

import getpass
import json
import socket
from collections.abc import Callable
from typing import Any

import click

from grayagent.stores import Store, open_store, resolve_store_url

OUTPUT = click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text", show_default=True,
                      help="Output format.")


def store_option(required: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--store", "store_url", envvar="GRAYAGENT_STORE", required=False,
                        help="Store URL: file:///dir or a directory path, etcd://..., nacos://... "
                             "[env: GRAYAGENT_STORE]" + ("" if required else " (or use --file)"))


def open_url(url: str | None) -> Store:
    return open_store(resolve_store_url(url))


def emit(output: str, data: Any, text: str) -> None:
    click.echo(json.dumps(data, ensure_ascii=False) if output == "json" else text)


def default_author() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def pairs(values: tuple[str, ...], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not K=V", param_hint=flag)
        key, value = item.split("=", 1)
        out.setdefault(key, value)
    return out


def service_logging() -> None:
    """A long-running service logs JSON lines when stderr is not a terminal (journald), at info by default."""
    from grayagent.logsetup import configure

    configure(click.get_current_context().meta.get("grayagent.log_level") or "info")
