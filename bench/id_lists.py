"""A 100,000-ID list (issue 15's goal: parse + validate + render within 2 s for each target). Prints one JSON line.

Timed: parse and validate (JSON and YAML), render for nginx reload mode, nginx dynamic mode (the pushed data)
and Envoy; `nginx -t` and `envoy --mode validate` on the rendered files; and on real proxies: a reload-mode
apply (nginx -t + reload + verify), a dynamic-mode list change (a push, no reload) and Envoy accepting the
routes (RDS) of the list. nginx and Envoy parts skip themselves when the binary is missing.
`--ids N` changes the size (e.g. 1000000 for the largest document the limits allow).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml

from grayagent import proxycheck
from grayagent.rules.model import Release, parse_document
from grayagent.stores.base import digest_of
from grayagent.targets import envoy_render, nginx_dynamic_render, nginx_render
from tests.docs import document, service

PORTS = {"stable": 9001, "canary": 9002}


def make(n: int, listen: int = 8080) -> dict[str, Any]:
    """User IDs as they come: mostly 8-digit numbers, some mixed-case handles."""
    ids = [f"{10_000_000 + i}" if i % 4 else f"User-{i:x}" for i in range(n)]
    svc = service("order", listen=f"127.0.0.1:{listen}",
                  servers={k: [f"127.0.0.1:{p}"] for k, p in PORTS.items()},
                  rules=[{"name": "beta", "match": {"headers": {"X-User-Id": {"list": "beta"}}}, "to": "canary"}],
                  split={"key": {"header": "X-User-Id"}, "weights": {"stable": 95, "canary": 5}})
    doc = document(svc)
    doc["spec"]["lists"] = {"beta": {"values": ids}}
    return doc


def timed(fn: Callable[[], Any], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


def compact(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def pure(figures: dict[str, Any], doc: dict[str, Any]) -> Release:
    content = compact(doc)
    as_yaml = yaml.dump(doc, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), default_flow_style=None).encode()
    release = parse_document(content, "bench")
    figures["doc_bytes_json"] = len(content)
    figures["parse_ms_json"] = timed(lambda: parse_document(content, "bench"))
    figures["parse_ms_yaml"] = timed(lambda: parse_document(as_yaml, "bench"))
    renders = {"nginx": lambda: nginx_render.render(release, 1, "sha256:x"),
               "dynamic": lambda: nginx_dynamic_render.render_data(release, 1, "sha256:x", "fp"),
               "envoy": lambda: envoy_render.render(release, 1, "sha256:x")}
    for name, fn in renders.items():
        figures[f"render_ms_{name}"] = timed(fn)
        figures[f"parse_render_ms_{name}"] = round(figures["parse_ms_json"] + figures[f"render_ms_{name}"], 1)
    figures["conf_bytes_nginx"] = len(renders["nginx"]().encode())
    figures["data_bytes_dynamic"] = len(renders["dynamic"]())
    figures["rds_bytes_envoy"] = sum(len(v) for k, v in envoy_render.render(release, 1, "x").items()
                                     if k.startswith("rds/"))
    return release


def checkers(figures: dict[str, Any], release: Release) -> None:
    if shutil.which("nginx"):
        figures["nginx_t_ms"] = timed(lambda: proxycheck.check_nginx(release, "bench"), 1)
    from tests.servers.envoy import envoy_binary

    try:
        figures["envoy_validate_ms"] = timed(lambda: proxycheck.check_envoy(release, "bench", envoy_binary()), 1)
    except Exception as exc:
        figures["envoy_validate_skipped"] = str(exc)[:80]


def _apply(target: Any, doc: dict[str, Any], version: int) -> tuple[float, bool]:
    content = compact(doc)
    release = parse_document(content, "bench")
    files = target.render(release, version, digest_of(content))
    started = time.perf_counter()
    result = target.apply(files, version, digest_of(content))
    if not result.ok:
        raise RuntimeError(result.error)
    return round((time.perf_counter() - started) * 1000, 1), result.reloaded


def live(figures: dict[str, Any], n: int, root: Path) -> None:
    from tests.agenthelp import dynamic_target, nginx_target
    from tests.envoyhelp import envoy_target, wait_target_live
    from tests.servers.envoy import envoy_binary
    from tests.servers.nginx import NginxInstance, lua_available
    from tests.servers.proc import free_port

    if shutil.which("nginx"):
        nginx = NginxInstance(root / "nginx").start()
        try:
            target = nginx_target(nginx)
            target.settings = dataclasses.replace(target.settings, verify_timeout=600)  # time it, whatever it takes
            figures["nginx_reload_apply_ms"], _ = _apply(target, make(n, free_port()), 1)
        finally:
            nginx.stop()
        if lua_available():
            nginx = NginxInstance(root / "nginx-dynamic", lua=True).start()
            try:
                target, port = dynamic_target(nginx, verify_timeout=600), free_port()
                figures["dynamic_first_apply_ms"], _ = _apply(target, make(n, port), 1)
                changed = make(n, port)
                changed["spec"]["lists"]["beta"]["values"][0] = "changed-id"
                figures["dynamic_list_change_ms"], reloaded = _apply(target, changed, 2)
                figures["dynamic_list_change_reloaded"] = reloaded
            finally:
                nginx.stop()
    try:
        envoy_binary()
        from tests.servers.envoy import EnvoyInstance
    except Exception:
        return
    envoy = EnvoyInstance(root / "envoy").start()
    try:
        target = envoy_target(envoy)
        started = time.perf_counter()
        _apply(target, make(n, free_port()), 1)
        wait_target_live(target, 1, timeout=120)
        figures["envoy_accept_ms"] = round((time.perf_counter() - started) * 1000, 1)
    finally:
        envoy.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ids", type=int, default=100_000)
    args = parser.parse_args()
    figures: dict[str, Any] = {"bench": "id_lists", "ids": args.ids, "goal_ms": 2000}
    release = pure(figures, make(args.ids))
    checkers(figures, release)
    with tempfile.TemporaryDirectory(prefix="grayagent-bench-") as tmp:
        live(figures, args.ids, Path(tmp))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
