"""A private nginx (master + workers) on loopback, with the agent's include file inside http {}."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.servers.proc import ManagedProcess, free_port, wait_until

LUA_MODULE = Path("/usr/lib/nginx/modules/ngx_http_lua_module.so")
NDK_MODULE = Path("/usr/lib/nginx/modules/ndk_http_module.so")  # Debian's Lua module needs the NDK first

MAIN_CONF = """\
{modules}daemon off;
worker_processes 2;
pid {root}/nginx.pid;
error_log {root}/error.log notice;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    include {conf};
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found is None:
        raise FileNotFoundError("nginx is not installed (make test installs Debian's nginx-light)")
    return found


def lua_available() -> bool:
    """nginx dynamic mode needs lua-nginx-module (Debian: libnginx-mod-http-lua)."""
    return LUA_MODULE.exists()


def _load_modules() -> str:
    return "".join(f"load_module {m};\n" for m in (NDK_MODULE, LUA_MODULE) if m.exists())


class NginxInstance:
    def __init__(self, root: Path, lua: bool = False) -> None:
        self.root = root
        self.lua = lua  # load the Lua module (dynamic mode) in the main conf
        self.conf = root / "conf.d" / "grayagent.conf"
        self.main_conf = root / "nginx.conf"
        self.verify_port = free_port()
        self.binary = nginx_binary()
        self.process: ManagedProcess | None = None

    @property
    def verify_listen(self) -> str:
        return f"127.0.0.1:{self.verify_port}"

    def start(self) -> NginxInstance:
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.conf.parent.mkdir(parents=True, exist_ok=True)
        if not self.conf.exists():
            self.conf.write_text("# empty until the agent applies a version\n")
        self.write_main_conf()
        self.process = ManagedProcess([self.binary, "-c", str(self.main_conf)], self.root / "stdout.log").start()
        wait_until(lambda: (self.root / "nginx.pid").exists(), 10, "nginx to write its pid file")
        return self

    def write_main_conf(self) -> None:
        modules = _load_modules() if self.lua else ""
        if self.lua and os.geteuid() == 0:
            # Workers read the Lua modules, and pytest's tmp dirs are private to the (root) test user.
            modules += "user root;\n"
        self.main_conf.write_text(MAIN_CONF.format(modules=modules, root=self.root, conf=self.conf))

    def restart(self) -> None:
        """Stop the master and start a fresh one on the same files: shared memory (lua_shared_dict) starts empty."""
        self.stop()
        (self.root / "nginx.pid").unlink(missing_ok=True)
        self.process = ManagedProcess([self.binary, "-c", str(self.main_conf)], self.root / "stdout.log").start()
        wait_until(lambda: (self.root / "nginx.pid").exists(), 10, "nginx to write its pid file")

    def reloads(self) -> int:
        """How many reloads the master has performed (counted from its error_log)."""
        try:
            text = (self.root / "error.log").read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return text.count("signal 1 (SIGHUP) received")

    def error_log(self) -> str:
        return (self.root / "error.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def test_config(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.binary, "-t", "-c", str(self.main_conf)], capture_output=True, text=True,
                              check=False)
