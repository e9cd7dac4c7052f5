"""Docs that must stay true: every schema field is documented; the published schema is the packaged one."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "grayagent" / "schema" / "grayrelease.schema.json"


def schema_fields(node: Any, prefix: str = "") -> set[str]:
    """Every property name in the schema, also dotted under its parent (`split.key.header`)."""
    out: set[str] = set()
    if not isinstance(node, dict):
        return out
    for name, sub in node.get("properties", {}).items():
        out |= {name, f"{prefix}.{name}" if prefix else name}
        out |= schema_fields(sub, name if not prefix else f"{prefix}.{name}")
    for key in ("items", "additionalProperties"):
        out |= schema_fields(node.get(key), prefix)
    return out


def test_every_schema_field_is_in_the_rule_reference() -> None:
    schema = json.loads(SCHEMA.read_text())
    names = {n.rsplit(".", 1)[-1] for n in schema_fields(schema)}
    for definition in schema["$defs"].values():
        names |= {n.rsplit(".", 1)[-1] for n in schema_fields(definition)}
    documented = set(re.findall(r"`([A-Za-z0-9_.]+)", (ROOT / "docs" / "rules.md").read_text()))
    documented |= {d.rsplit(".", 1)[-1] for d in documented}
    missing = sorted(names - documented)
    assert not missing, f"docs/rules.md does not document: {', '.join(missing)}"


def test_published_schema_is_the_packaged_one() -> None:
    published = ROOT / "schemas" / "grayrelease.schema.json"
    assert published.read_bytes() == SCHEMA.read_bytes()


def test_readme_opens_with_the_developer_commands_then_the_install() -> None:
    blocks = sh_blocks((ROOT / "README.md").read_text())
    assert "make demo" in blocks[0] and "make test" in blocks[0]
    assert "make install" in blocks[1] and "systemctl enable --now grayagent-agent" in blocks[1]


def every_help_text() -> dict[str, str]:
    import click

    from grayagent.cli import cli

    texts: dict[str, str] = {}

    def walk(command: click.Command, path: list[str]) -> None:
        with click.Context(command, info_name=" ".join(path)) as ctx:
            texts[" ".join(path)] = command.get_help(ctx)
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*path, name])
    walk(cli, ["grayagent"])
    return texts


def test_help_points_to_the_shipped_manual_not_to_repository_files() -> None:
    from grayagent import docs

    texts = every_help_text()
    assert "grayagent docs" in texts["grayagent"]
    for command, text in texts.items():
        assert not re.search(r"docs/|deploy/|\.md\b", text), f"{command} --help names a file pip does not install"
        for topic in re.findall(r"grayagent docs ([a-z-]+)", re.sub(r"-\n\s*", "-", text)):
            assert topic in docs.SOURCES, f"{command} --help names an unknown docs topic {topic}"
    for topic in docs.SOURCES:
        assert docs.path(topic).is_file()


# ---------------------------------------------------------------------------------------------- doc commands
# Every ```sh block of these pages runs. A block of real commands runs as one bash script in a sandbox: system
# paths map into it, and shims stand in for what a test must not do to the host (apt-get checks that the
# packages exist, git clone links a copy of the examples, `make install` lays out the sandbox with the real
# Makefile's install-store, other make targets dry-run, systemctl starts and stops the real agent and
# controller on a private nginx). A synopsis block (FILE, DIR, [optional], a|b) is parsed line by line with
# the CLI's own parser, with placeholders filled in.
RUN_DOCS = ("README.md", "docs/operations.md", "docs/stores.md")
SYNOPSIS = re.compile(r"\b(FILE|DIR|URL|MSG|N|A|B|SECONDS)\b|\[-|\w\|\w|\.\.\.")
PLACEHOLDERS = {"FILE...": "f.yaml", "FILE": "f.yaml", "DIR": "/srv/store", "URL": "/srv/store", "MSG": "m",
                "N": "2", "A": "1", "B": "2", "SECONDS": "5", "FILE|-": "-", "...": None}

# What `systemctl start` does for a Type=notify unit: start it with $NOTIFY_SOCKET and return once it sent
# READY=1 (or fail if it exits first). Prints the pid.
NOTIFY_START = """\
import os, socket, subprocess, sys, time
log, argv = sys.argv[1], sys.argv[2:]
path = log + ".notify"
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
    sock.bind(path)
    sock.settimeout(0.2)
    proc = subprocess.Popen(argv, env={**os.environ, "NOTIFY_SOCKET": path}, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if b"READY=1" in sock.recv(4096):
                print(proc.pid)
                sys.exit(0)
        except TimeoutError:
            pass
    sys.exit(f"{argv[:2]} did not become ready (exit {proc.poll()})")
"""

SHIMS = r'''
set -euo pipefail
pids=()
trap 'for p in "${pids[@]}" $(jobs -p); do kill "$p" 2>/dev/null || true; done; wait' EXIT
apt-get() {
    [ "$1" = update ] && return 0
    for p in "$@"; do case "$p" in -*|install) ;; *) command apt-cache show "$p" >/dev/null ;; esac; done
}
git() { [ "$1" = clone ] && ln -s "$CLONE" "$(basename "${@: -1}")"; }
make() {
    if [ "$1" = install ]; then
        command make -s -C "$ROOT" install-store DESTDIR="$SANDBOX" GRAYAGENT_USER=root >/dev/null
        sed -i -e "s|\\([:=] *\\)/var/lib/grayagent|\\1$SANDBOX/var/lib/grayagent|g" -e "s|/etc/nginx/conf.d/grayagent.conf|$NGINX_CONF|" \
            -e "s|/etc/nginx/nginx.conf|$NGINX_MAIN_CONF|" -e "s|/usr/sbin/nginx|$NGINX_BIN|" \
            -e "s|127.0.0.1:18089|$VERIFY_LISTEN|" -e "s|127.0.0.1:9180|127.0.0.1:0|" \
            "$SANDBOX/etc/grayagent/agent.yaml" "$SANDBOX/etc/grayagent/rollout.env"
    else
        command make -n -C "$ROOT" "$@" >/dev/null
    fi
}
systemctl() {
    local action="$1"; shift
    [ "$action" = enable ] && [ "$1" = --now ] && { action=start; shift; }
    for unit in "$@"; do
        test -f "$ROOT/deploy/$unit.service"
        case "$action/$unit" in
        start/grayagent-agent)
            pid=$(notify-start "$SANDBOX/$unit.log" grayagent agent --config "$SANDBOX/etc/grayagent/agent.yaml")
            pids+=("$pid"); echo "$pid" >"$SANDBOX/$unit.pid" ;;
        start/grayagent-rollout)
            pid=$(set -a; . "$SANDBOX/etc/grayagent/rollout.env"; notify-start "$SANDBOX/$unit.log" \
                grayagent rollout run --interval 0.2 --state-dir "$SANDBOX/var/lib/grayagent-rollout")
            pids+=("$pid"); echo "$pid" >"$SANDBOX/$unit.pid" ;;
        stop/*) kill "$(cat "$SANDBOX/$unit.pid")" ;;
        esac
    done
}
'''


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"^ *```sh\n(.*?)^ *```", text, flags=re.S | re.M)


def commands(block: str) -> list[str]:
    """The block's command lines, continuations joined, indentation removed."""
    return [line.strip() for line in textwrap.dedent(block).replace("\\\n", " ").splitlines() if line.strip()]


def synopsis_argv(line: str) -> list[list[str]]:
    """A synopsis line as concrete argument lists: options in [] kept, each a|b alternative on its own."""
    words = [w for w in shlex.split(line.replace("[", " ").replace("]", " "), comments=True)]
    variants: list[list[str]] = [[]]
    for word in words:
        if word in PLACEHOLDERS:
            filled = PLACEHOLDERS[word]
            variants = [[*v, filled] for v in variants] if filled is not None else variants
        elif "|" in word and not word.startswith(("-", "http")):
            variants = [[*v, alt] for v in variants for alt in word.split("|")]
        else:
            variants = [[*v, word] for v in variants]
    return variants


def parse_with_the_cli(argv: list[str]) -> None:
    """Parse argv the way `grayagent` would, without running the command: unknown verbs or flags, bad values
    and missing arguments raise click's usage errors."""
    import click

    from grayagent.cli import cli

    def rest(ctx: click.Context) -> list[str]:  # a group keeps its subcommand's words here (click 8.x)
        return [*ctx._protected_args, *ctx.args]

    ctx = cli.make_context("grayagent", argv[1:], resilient_parsing=False)
    command: click.Command = cli
    while isinstance(command, click.Group) and rest(ctx):
        name, sub, words = command.resolve_command(ctx, rest(ctx))
        assert sub is not None and name is not None, f"unknown command in {argv}"
        ctx = sub.make_context(name, words, parent=ctx)
        command = sub
    assert not isinstance(command, click.Group), f"{argv}: a group without its command"


def test_synopsis_parser_refuses_an_undocumented_flag() -> None:
    import click

    parse_with_the_cli(["grayagent", "history", "--store", "/srv/store"])
    parse_with_the_cli(["grayagent", "rollout", "pause", "product", "--store", "/srv/store"])
    for wrong in (["history", "--stroe", "/srv/store"], ["rollout", "pause", "product", "--wait", "5"],
                  ["diff", "1"], ["revert", "x", "--store", "/srv/store"]):
        with pytest.raises(click.UsageError):
            parse_with_the_cli(["grayagent", *wrong])


@pytest.mark.parametrize("page", RUN_DOCS)
def test_every_synopsis_line_parses(page: str) -> None:
    checked = 0
    for block in sh_blocks((ROOT / page).read_text()):
        if not SYNOPSIS.search(block):
            continue
        for line in commands(block):
            argv = shlex.split(line, comments=True)
            if argv[0] == "grayagent":
                for variant in synopsis_argv(line):
                    parse_with_the_cli(variant)
            elif argv[0] == "envoy":  # the bootstrap it names ships in deploy/
                assert (ROOT / argv[argv.index("-c") + 1]).is_file(), line
            else:
                raise AssertionError(f"{page}: no way to check {line!r}; add it to tests/test_docs.py")
            checked += 1
    assert checked or page != "README.md"


def map_paths(text: str, sandbox: Path, ports: dict[str, int]) -> str:
    """System paths and fixed ports of the docs, moved into the sandbox."""
    table = {"/var/lib/grayagent": f"{sandbox}/var/lib/grayagent", "/etc/grayagent": f"{sandbox}/etc/grayagent",
             "/tmp/etcd-try": f"{sandbox}/etcd-try",
             **{f"127.0.0.1:{fixed}": f"127.0.0.1:{free}" for fixed, free in ports.items()}}
    return re.sub("|".join(re.escape(k) for k in table), lambda m: table[m.group(0)], text)


def report_fleet(store: Path, hosts: int, stop: threading.Event) -> None:
    """Other gateways of the fleet the docs speak of: each reports the current version, healthy."""
    from grayagent.stores.file import FileStore

    fleet = FileStore(str(store))
    while not stop.wait(0.1):
        current = fleet.current()
        for i in range(hosts):
            fleet.report(f"gw{i:02d}", {"applied_version": current.meta.version if current else None,
                                        "healthy": True, "state": "healthy", "store_reachable": True})


@pytest.mark.parametrize("page", RUN_DOCS)
def test_every_command_runs(page: str, tmp_path: Path) -> None:
    from grayagent.stores.file import FileStore
    from tests.docs import document, dump, service
    from tests.servers.nginx import NginxInstance
    from tests.servers.proc import free_port

    script = "\n".join(b for b in sh_blocks((ROOT / page).read_text()) if not SYNOPSIS.search(b))
    sandbox = tmp_path
    listen = free_port()
    clone = sandbox / "clone"
    shutil.copytree(ROOT / "examples", clone / "examples")
    demo = clone / "examples" / "demo.yaml"
    demo.write_text(demo.read_text().replace("127.0.0.1:18480", f"127.0.0.1:{listen}"))
    (clone / "rules.yaml").write_text(demo.read_text())
    (sandbox / "bin").mkdir()
    (sandbox / "bin" / "grayagent").write_text(f"#!/bin/sh\nexec {sys.executable} -m grayagent \"$@\"\n")
    (sandbox / "bin" / "notify-start").write_text(f"#!{sys.executable}\n{NOTIFY_START}")
    for tool in ("grayagent", "notify-start"):
        (sandbox / "bin" / tool).chmod(0o755)
    (sandbox / "work").mkdir()
    store = sandbox / "var/lib/grayagent/store"
    installed = page != "README.md"  # the reference pages speak of a host after `make install`, with history
    if installed:  # the runbook speaks of versions 41 and 42
        store.mkdir(parents=True)
        history = FileStore(str(store))
        for n in range(41):
            svc = service(listen=f"127.0.0.1:{listen}", split={"key": {"header": "X-User-Id"},
                                                              "weights": {"stable": 100 - n, "canary": n}})
            history.publish(dump(document(svc)), n, "ops", f"step {n}")
    nginx = NginxInstance(sandbox / "nginx").start()
    stop = threading.Event()
    fleet = threading.Thread(target=report_fleet, args=(store, 11, stop), daemon=True)
    if page == "docs/operations.md":  # 12 gateways: the agent below and 11 others
        fleet.start()
    env = {**os.environ, "PATH": f"{sandbox / 'bin'}:{os.environ['PATH']}", "ROOT": str(ROOT),
           "SANDBOX": str(sandbox), "CLONE": str(clone), "STORE": str(store), "NGINX_CONF": str(nginx.conf),
           "NGINX_MAIN_CONF": str(nginx.main_conf), "NGINX_BIN": nginx.binary, "VERIFY_LISTEN": nginx.verify_listen}
    try:
        ports = {2379: free_port(), 2380: free_port()}
        prelude = "make install\n" if installed else ""
        done = subprocess.run(["bash", "-x", "-c", SHIMS + prelude + map_paths(script, sandbox, ports)], env=env,
                              cwd=clone if page != "README.md" else sandbox / "work", capture_output=True,
                              text=True, timeout=240, check=False)
    finally:
        stop.set()
        nginx.stop()
    logs = "".join(p.read_text() for p in sandbox.glob("*.log"))
    assert done.returncode == 0, f"{page}:\n{done.stdout}\n{done.stderr[-6000:]}\n{logs[-3000:]}"
    assert "Traceback" not in done.stderr + logs, done.stderr + logs


def test_docs_verb_prints_a_topic_and_names_a_mistyped_one() -> None:
    run = [sys.executable, "-m", "grayagent", "docs"]
    listing = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert listing.splitlines()[1].split()[0] == "operations"
    page = subprocess.run([*run, "stores"], capture_output=True, text=True, check=True).stdout
    assert page == (ROOT / "docs" / "stores.md").read_text()
    wrong = subprocess.run([*run, "oprations"], capture_output=True, text=True, check=False)
    assert wrong.returncode == 2 and "did you mean operations?" in wrong.stderr and not wrong.stdout
