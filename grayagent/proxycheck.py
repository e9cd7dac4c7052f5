"""`grayagent publish --check nginx|envoy`: the proxy's own checker on the rendered document, before publishing.

Validation refuses what it can know statically; the proxy's checker catches the rest (limits of the host's
nginx build, an Envoy version's stricter parsing). Each check renders the document as the agent would, in a
throwaway directory, and runs the same command the agent runs before an apply.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from grayagent.errors import InvalidDocument, Problem, UsageError
from grayagent.rules.model import Release
from grayagent.targets.base import StepFailed, run_command
from grayagent.targets.envoy import VALIDATE_ARGS, first_error_line
from grayagent.targets.envoy_render import render as render_envoy
from grayagent.targets.envoy_render import validation_bootstrap
from grayagent.targets.nginx_process import first_error
from grayagent.targets.nginx_render import render as render_nginx

CHECKS = ("nginx", "envoy")

# Everything nginx would write goes under the throwaway prefix; `nginx -t` parses and opens files, binds nothing.
_NGINX_MAIN = """\
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    include {conf};
}}
"""


def check_nginx(release: Release, source: str, binary: str = "nginx", timeout: float = 60.0) -> None:
    with tempfile.TemporaryDirectory(prefix="grayagent-check-") as tmp:
        root = Path(tmp)
        (root / "tmp").mkdir()
        conf = root / "grayagent.conf"
        conf.write_text(render_nginx(release, 0, "check"), encoding="utf-8")  # ID lists may hold unicode
        main = root / "nginx.conf"
        main.write_text(_NGINX_MAIN.format(root=root, conf=conf), encoding="ascii")
        done = _run([binary, "-t", "-q", "-p", str(root), "-e", str(root / "error.log"), "-c", str(main)],
                    source, timeout)
        if done[0] != 0:
            raise InvalidDocument([Problem(source, "", f"nginx -t refused it: {first_error(done[1])}")])


def check_envoy(release: Release, source: str, binary: str = "envoy", timeout: float = 120.0) -> None:
    bootstrap = validation_bootstrap(render_envoy(release, 0, "check"))
    with tempfile.TemporaryDirectory(prefix="grayagent-check-") as tmp:
        candidate = Path(tmp) / "bootstrap.json"
        candidate.write_bytes(bootstrap)
        done = _run([binary, "--mode", "validate", "-c", str(candidate), *VALIDATE_ARGS], source, timeout)
        if done[0] != 0:
            refusal = first_error_line(done[1])
            raise InvalidDocument([Problem(source, "", f"envoy --mode validate refused it: {refusal}")])


def _run(argv: list[str], source: str, timeout: float) -> tuple[int, str]:
    try:
        done = run_command(argv, timeout=timeout)
    except StepFailed as exc:  # the binary is missing, or it hung
        raise UsageError(f"--check: {exc}") from None
    return done.returncode, done.stderr + done.stdout


def check(release: Release, source: str, proxy: str, binary: str | None = None) -> None:
    """Run one proxy's checker on `release`; raise InvalidDocument naming the file and the proxy's complaint."""
    if proxy == "nginx":
        check_nginx(release, source, binary or "nginx")
    elif proxy == "envoy":
        check_envoy(release, source, binary or "envoy")
    else:
        raise ValueError(f"unknown proxy {proxy!r}; expected one of {', '.join(CHECKS)}")
