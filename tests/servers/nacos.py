"""A real standalone Nacos server on loopback, auth on, for tests.

The server jars are the pig-mesh republish of Nacos on Maven Central
(``io.github.pig-mesh.nacos``, version 3.1.0-bugfix: the only one served here). They are
fetched once by ``tools/nacos-server/fetch.sh`` into ``${GRAYAGENT_CACHE:-~/.cache/grayagent}``
(Maven's ~/.m2 caches the download too) and run from that classpath with
``tools/nacos-server/src/NacosTestMain.java`` as main class. Needs Java 17+ and Maven.

Auth is on (``nacos.core.auth.enabled``) with a random token secret and server identity; the
admin user ``nacos`` gets ``password`` on first start. Storage is embedded Derby under the
server's ``home``, which survives ``stop()``/``restart()`` together with the ports.
The v1 OpenAPI is fully enabled (``nacos.core.api.compatibility.*``), as nacos-sdk-python 2.x's
``nacos.NacosClient`` needs it. See docs/notes/nacos-probe.md for the API facts.

Ports (all 127.0.0.1 except JRaft, which Nacos binds on every interface):
``port`` (HTTP, context path /nacos), ``port+1000`` (client gRPC), ``port+1001`` (cluster gRPC),
``port-1000`` (JRaft), and ``console_port`` when ``console=True``.

Example::

    with NacosServer(tmp_path) as nacos:
        client = nacos.NacosClient(nacos.server_addr, username=nacos.username, password=nacos.password)
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tests.servers.proc import ManagedProcess, free_port, wait_until

NACOS_VERSION = "3.1.0-bugfix"
FETCH_SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "nacos-server" / "fetch.sh"
MAIN_CLASS = "NacosTestMain"
DEFAULT_JVM_OPTS = (
    "-Xms64m", "-Xmx384m", "-XX:MaxMetaspaceSize=192m", "-XX:ReservedCodeCacheSize=64m",
    "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xss512k", "-XX:-UsePerfData",
)


def nacos_unavailable_reason(version: str = NACOS_VERSION) -> str | None:
    """Why a Nacos server cannot be had here (for ``pytest.skip``), or None when it can."""
    cache = Path(os.environ.get("GRAYAGENT_CACHE") or Path.home() / ".cache" / "grayagent") / f"nacos-{version}"
    if shutil.which("java") is None:
        return "java is not installed (Nacos needs Java 17+)"
    if not (cache / "READY").is_file() and shutil.which("mvn") is None:
        return f"mvn is not installed and {cache} is not fetched yet (run tools/nacos-server/fetch.sh)"
    return None


def ensure_nacos(version: str = NACOS_VERSION, timeout: float = 1800.0) -> Path:
    """Make sure the server classpath is in the cache (a no-op when it is); return its dir."""
    env = {**os.environ, "NACOS_VERSION": version}
    res = subprocess.run(["bash", str(FETCH_SCRIPT)], capture_output=True, text=True, env=env,
                         timeout=timeout, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{FETCH_SCRIPT} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    dist = Path(res.stdout.strip().splitlines()[-1])
    if not (dist / "READY").is_file():
        raise RuntimeError(f"{FETCH_SCRIPT} printed {dist}, which has no READY marker")
    return dist


def _can_bind(port: int, host: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_nacos_port(attempts: int = 200) -> int:
    """A main port P such that P-1000 (JRaft, any interface), P, P+1000 and P+1001 are all free."""
    for _ in range(attempts):
        port = free_port()
        if not 2024 <= port <= 64534:
            continue
        if all(_can_bind(p, "127.0.0.1") for p in (port, port + 1000, port + 1001)) and _can_bind(port - 1000, ""):
            return port
    raise RuntimeError("no free port block for Nacos (P-1000, P, P+1000, P+1001)")


class NacosServer:
    """One standalone Nacos process; ``home`` (conf, Derby data, logs) lives under ``base_dir``."""

    def __init__(self, base_dir: Path, *, password: str = "grayagent-nacos-pw", console: bool = False,
                 start_timeout: float = 120.0, jvm_opts: tuple[str, ...] = DEFAULT_JVM_OPTS,
                 extra_properties: dict[str, str] | None = None, version: str = NACOS_VERSION) -> None:
        self.home = Path(base_dir) / "nacos-home"
        self.username = "nacos"  # Nacos' admin-init endpoint always names the admin user "nacos"
        self.password = password
        self.console = console
        self.start_timeout = start_timeout
        self.jvm_opts = tuple(jvm_opts)
        self.extra_properties = dict(extra_properties or {})
        self.version = version
        self.port = 0
        self.console_port = 0
        self.proc: ManagedProcess | None = None
        self.startup_seconds: float | None = None  # wall time of the last start(), spawn to ready
        self._admin_ready = False
        self._log_start = 0  # log size when the current process was spawned

    # ------------------------------------------------------------------ addresses
    @property
    def server_addr(self) -> str:
        """``127.0.0.1:port``, what nacos-sdk-python takes as ``server_addresses``."""
        return f"127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:port/nacos``; the OpenAPI paths (``/v1/cs/configs``, ...) go after it."""
        return f"http://127.0.0.1:{self.port}/nacos"

    @property
    def console_url(self) -> str:
        if not self.console:
            raise RuntimeError("started without console=True")
        return f"http://127.0.0.1:{self.console_port}"

    @property
    def grpc_port(self) -> int:
        return self.port + 1000

    @property
    def log_path(self) -> Path:
        return self.home / "nacos.out"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> NacosServer:
        if self.alive():
            return self
        dist = ensure_nacos(self.version)
        first_start = not self.port
        for attempt in range(3):
            if not self.port:
                self.port = free_nacos_port()
                self.console_port = free_port() if self.console else 0
                self._write_conf()
            started = time.monotonic()
            self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.proc = ManagedProcess(self._argv(dist), self.log_path, cwd=self.home).start()
            try:
                self._wait_ready()
                if not self._admin_ready:
                    self._init_admin()
            except BaseException:
                self.kill()
                # Another test may take one of the four ports between free_nacos_port() and the bind; a
                # first start (no data yet tied to the ports) moves to fresh ones.
                if first_start and attempt < 2 and self._port_clash():
                    self.port = 0
                    continue
                raise
            self.startup_seconds = time.monotonic() - started
            return self
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM and wait (Spring shuts down in ~1-2 s); data and ports stay for ``start()``."""
        if self.proc is not None:
            self.proc.stop(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    def restart(self) -> NacosServer:
        self.stop()
        return self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def __enter__(self) -> NacosServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ HTTP helpers
    def login(self) -> str:
        """A fresh accessToken for the admin user (``POST /v1/auth/login``)."""
        status, body, _ = self.request("POST", "/v1/auth/login",
                                       data={"username": self.username, "password": self.password}, token=None)
        if status != 200:
            raise RuntimeError(f"nacos login failed: {status} {body[:200]}")
        return str(json.loads(body)["accessToken"])

    def request(self, method: str, path: str, params: dict[str, str] | None = None,
                data: dict[str, str] | None = None, headers: dict[str, str] | None = None,
                token: str | None = "login", timeout: float = 10.0) -> tuple[int, str, dict[str, str]]:
        """One HTTP call to ``base_url + path``; returns (status, body, headers), never raises on 4xx/5xx.

        ``token="login"`` logs in first; pass a token string to reuse one, or None for no token.
        """
        query = dict(params or {})
        if token == "login":
            token = self.login()
        if token:
            query["accessToken"] = token
        url = self.base_url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read().decode(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace"), dict(err.headers)

    def create_namespace(self, namespace_id: str, name: str | None = None) -> None:
        status, body, _ = self.request("POST", "/v3/admin/core/namespace",
                                       data={"namespaceId": namespace_id, "namespaceName": name or namespace_id})
        if status != 200 or json.loads(body).get("data") is not True:
            raise RuntimeError(f"create namespace {namespace_id}: {status} {body[:200]}")

    # ------------------------------------------------------------------ internals
    def _write_conf(self) -> None:
        conf = self.home / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        (self.home / "tmp").mkdir(exist_ok=True)
        props = {
            "nacos.server.main.port": str(self.port),
            "nacos.server.contextPath": "/nacos",
            "server.address": "127.0.0.1",
            "nacos.console.port": str(self.console_port or self.port),
            "nacos.core.auth.enabled": "true",
            "nacos.core.auth.admin.enabled": "true",
            "nacos.core.auth.console.enabled": "true",
            "nacos.core.auth.system.type": "nacos",
            # read users from Derby on each login; with the cache a new admin password works only after its 15 s reload
            "nacos.core.auth.caching.enabled": "false",
            # Base64 of 48 random bytes (Nacos wants >= 32 bytes); fixed for this home so tokens survive restarts
            "nacos.core.auth.plugin.nacos.token.secret.key": base64.b64encode(secrets.token_bytes(48)).decode(),
            "nacos.core.auth.server.identity.key": "grayagent-test",
            "nacos.core.auth.server.identity.value": secrets.token_hex(16),
            # 3.x answers 410 Gone on the v1 admin/console APIs (config list, history, ...) unless enabled
            "nacos.core.api.compatibility.client.enabled": "true",
            "nacos.core.api.compatibility.admin.enabled": "true",
            "nacos.core.api.compatibility.console.enabled": "true",
            "nacos.istio.mcp.server.enabled": "false",
            "nacos.console.ui.enabled": "false",
            "server.tomcat.accesslog.enabled": "false",
            "server.tomcat.basedir": str(self.home / "tomcat"),
            "management.endpoints.web.exposure.include": "health",
            **self.extra_properties,
        }
        (conf / "application.properties").write_text("".join(f"{k}={v}\n" for k, v in props.items()))

    def _argv(self, dist: Path) -> list[str]:
        jars = [str(dist / "lib" / name) for name in (dist / "classpath.txt").read_text().split()]
        return [
            "java", *self.jvm_opts,
            f"-Djava.io.tmpdir={self.home / 'tmp'}",
            "-Dnacos.standalone=true",
            f"-Dnacos.deployment.type={'merged' if self.console else 'server'}",
            f"-Dnacos.home={self.home}",
            "-Dnacos.inetutils.ip-address=127.0.0.1",
            "-Dnacos.remote.grpc.listen.ip=127.0.0.1",
            "-cp", os.pathsep.join([str(dist / "classes"), *jars]),
            MAIN_CLASS,
            f"--spring.config.additional-location=file:{self.home / 'conf'}/",
        ]

    def _this_start_log(self) -> str:
        """The log written since the last spawn (the file is appended to across restarts)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _port_clash(self) -> bool:
        return "Address already in use" in self._this_start_log()

    def _failed(self) -> str | None:
        """Why the starting server will never get ready, or None (checked outside wait_until, which swallows)."""
        if not self.alive():
            return "nacos exited"
        if "Application run failed" in self._this_start_log():
            return "nacos failed to start (Spring: Application run failed)"  # the JVM may linger, alive
        return None

    def _ready(self) -> bool:
        if self._failed():
            return True  # stop waiting; _wait_ready raises
        status, body, _ = self.request("GET", "/v3/admin/core/state/readiness", token=None, timeout=2.0)
        if status != 200 or '"ok"' not in body:
            return False
        if self.console:
            with urllib.request.urlopen(self.console_url + "/v3/console/health/readiness", timeout=2.0) as resp:
                return resp.status == 200
        return True

    def _wait_ready(self) -> None:
        try:
            wait_until(self._ready, self.start_timeout, "nacos readiness", interval=0.2)
            failed = self._failed()
            if failed:
                raise RuntimeError(failed)
        except (TimeoutError, RuntimeError) as exc:
            tail = self.proc.log_tail(60) if self.proc else ""
            raise RuntimeError(f"{exc}\n--- {self.log_path}\n{tail}") from None

    def _init_admin(self) -> None:
        """Set the admin password once (Derby keeps it); a 409 means an earlier start already did."""
        status, body, _ = self.request("POST", "/v3/auth/user/admin", data={"password": self.password}, token=None)
        reply = json.loads(body) if status == 200 else {}
        if reply.get("code") not in (0, 409):
            raise RuntimeError(f"nacos admin init failed: {status} {body[:200]}")
        self.login()  # raises if an earlier admin has another password
        self._admin_ready = True
