"""Every nginx mistake gets our own one-line answer naming what to fix; a killed agent's temp files go."""

from __future__ import annotations

import socket
from pathlib import Path

from grayagent.rules.model import parse_document
from grayagent.stores.base import digest_of
from grayagent.targets.base import Target
from grayagent.targets.nginx import NginxSettings, NginxTarget
from tests.agenthelp import dynamic_target, nginx_target
from tests.docs import document, dump, service
from tests.servers.nginx import NginxInstance, lua_available
from tests.servers.proc import free_port


def _apply(target: Target, port: int, backends, version: int = 1) -> tuple[bool, str]:
    content = dump(document(service(listen=f"127.0.0.1:{port}",
                                    servers={n: [f"127.0.0.1:{b.port}"] for n, b in backends.items()})))
    result = target.apply(target.render(parse_document(content, "t"), version, digest_of(content)), version,
                          digest_of(content))
    return result.ok, result.error or ""


def _apply_on_a_taken_port(target: Target, backends) -> tuple[int, bool, str]:
    """Version 1 on a free port, then version 2 on a port another process listens on."""
    assert _apply(target, free_port(), backends) == (True, "")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        ok, error = _apply(target, port, backends, version=2)
    return port, ok, error


def test_temp_files_left_by_a_killed_agent_are_removed_on_start(nginx: NginxInstance, backends) -> None:
    conf_dir = nginx.conf.parent
    leftovers = [conf_dir / ".grayagent.conf.k9x2_a1.tmp", conf_dir / "..grayagent.conf.last-good.zz81.tmp"]
    others = [conf_dir / ".site.conf.k9x2_a1.tmp", conf_dir / "grayagent.conf.tmp"]  # not ours: kept
    for path in leftovers + others:
        path.write_text("upstream half-written {")
    assert _apply(nginx_target(nginx), free_port(), backends) == (True, "")
    assert [p for p in leftovers if p.exists()] == []
    assert all(p.exists() for p in others)


def test_dynamic_mode_removes_its_temp_leftovers_too(tmp_path: Path, backends) -> None:
    if not lua_available():
        return
    nginx = NginxInstance(tmp_path / "nginx", lua=True).start()
    try:
        leftover = nginx.conf.parent / ".grayagent-routes.lua.Qw3rty.tmp"
        leftover.write_text("return {")
        assert _apply(dynamic_target(nginx), free_port(), backends) == (True, "")
        assert not leftover.exists()
    finally:
        nginx.stop()


def test_nginx_not_running_is_said_in_our_words(nginx: NginxInstance, backends) -> None:
    target = nginx_target(nginx)
    nginx.stop()
    pid_file = nginx.root / "nginx.pid"
    for pid_content in (None, ""):  # no pid file; an empty one (nginx: 'invalid PID number ""')
        if pid_content is None:
            pid_file.unlink(missing_ok=True)
        else:
            pid_file.write_text(pid_content)
        ok, error = _apply(target, free_port(), backends)
        assert not ok
        assert "nginx is not running" in error and str(pid_file) in error and "start nginx" in error, error
        assert "invalid PID" not in error


def test_missing_binary_names_the_setting(nginx: NginxInstance, backends) -> None:
    target = NginxTarget(NginxSettings(conf=nginx.conf, main_conf=nginx.main_conf, binary="/opt/none/sbin/nginx",
                                       verify_listen=nginx.verify_listen))
    ok, error = _apply(target, free_port(), backends)
    assert not ok and "'/opt/none/sbin/nginx' not found" in error and "--nginx-bin" in error, error


def test_a_taken_port_names_what_set_it(nginx: NginxInstance, backends) -> None:
    target = NginxTarget(NginxSettings(conf=nginx.conf, main_conf=nginx.main_conf, binary=nginx.binary,
                                       verify_listen=nginx.verify_listen, verify_timeout=1.0))
    port, ok, error = _apply_on_a_taken_port(target, backends)
    assert not ok
    assert f"listen 127.0.0.1:{port} is already in use" in error and "service product" in error, error
    assert target.live_version() is not None and target.live_version()[0] == 1  # type: ignore[index]


def test_dynamic_mode_names_a_taken_port_too(tmp_path: Path, backends) -> None:
    if not lua_available():
        return
    nginx = NginxInstance(tmp_path / "nginx", lua=True).start()
    try:
        target = dynamic_target(nginx, verify_timeout=1.0)
        port, ok, error = _apply_on_a_taken_port(target, backends)
        assert not ok and f"listen 127.0.0.1:{port} is already in use" in error, error
        assert target.live_version() is not None and target.live_version()[0] == 1  # type: ignore[index]
    finally:
        nginx.stop()
