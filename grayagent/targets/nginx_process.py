"""The running nginx, as both nginx modes drive it: `nginx -t`, `nginx -s reload`, and the files that say
what nginx last verifiably served. Each failure becomes one line in our own words, naming what to fix.
"""

from __future__ import annotations

import contextlib
import errno
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from grayagent.fsutil import atomic_write
from grayagent.targets.base import StepFailed, run_command

PLACEHOLDER = b"# grayagent: no version applied yet\n"
OLD_WORKERS_GRACE = 0.15  # > nginx's 100 ms between starting new workers and retiring the old ones

# nginx's own words when `-s` finds no master: no pid file, an empty one, or a pid that is gone.
# ([emerg] is a config problem, e.g. an include that cannot be opened: never "not running".)
_NOT_RUNNING = re.compile(r'\[error\] (?:\d+#\d+: )?(?:open\(\) "(?P<open>[^"]+)" failed'
                          r'|invalid PID number "[^"]*" in "(?P<pid>[^"]+)"'
                          r"|kill\(\d+, \d+\) failed \(3: No such process\))")


def first_error(output: str) -> str:
    """The line of nginx's output that says what went wrong."""
    for line in output.splitlines():
        if "[emerg]" in line or "[error]" in line or "[alert]" in line:
            return line.removeprefix("nginx: ").strip()
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


@dataclass(frozen=True)
class NginxProcess:
    binary: str
    main_conf: Path
    binary_flag: str = "--nginx-bin"  # how the operator set `binary`, for the error that it is missing

    def command(self, *args: str) -> list[str]:
        return [self.binary, *args, "-c", str(self.main_conf)]

    def _run(self, *args: str) -> tuple[int, str]:
        if shutil.which(self.binary) is None:
            raise StepFailed(f"nginx binary {self.binary!r} not found (set {self.binary_flag} / "
                             f"{self.binary_flag.removeprefix('--').replace('-', '_')} to nginx's path)")
        done = run_command(self.command(*args))
        return done.returncode, done.stderr + done.stdout

    def check(self) -> None:
        code, output = self._run("-t", "-q")
        if code != 0:
            error = first_error(output)
            if 'unknown directive "lua_' in error or 'unknown directive "init_by_lua' in error:
                error += (" (dynamic mode needs lua-nginx-module: load_module ngx_http_lua_module.so; "
                          "Debian: libnginx-mod-http-lua)")
            raise StepFailed(f"nginx -t failed: {error}")

    def reload(self) -> None:
        code, output = self._run("-s", "reload")
        if code == 0:
            return
        not_running = _NOT_RUNNING.search(output)
        if not_running is not None:
            pid_file = not_running.group("open") or not_running.group("pid")
            where = f"pid file {pid_file}, " if pid_file else ""
            raise StepFailed(f"nginx is not running ({where}config {self.main_conf}): start nginx "
                             f"(e.g. systemctl start nginx); the agent applies once it runs")
        raise StepFailed(f"nginx -s reload failed: {first_error(output)}")


class LastGood:
    """The file nginx last verifiably served, kept beside the conf under a name no `include *.conf` loads.

    Not simply what is on disk: an agent killed between placing a candidate and checking it leaves an
    unchecked file there, which must never be restored."""

    def __init__(self, conf: Path, path: Path, also_ours: tuple[str, ...] = ()) -> None:
        self.conf = conf
        self.path = path
        self.ours = (conf.name, path.name, *also_ours)  # every file the agent writes in the conf's directory
        self._cleaned = False

    def remove_leftovers_once(self) -> None:
        """At the first apply: a killed agent's temp files; nobody else writes beside our files then."""
        if not self._cleaned:
            remove_leftover_temps(self.conf.parent, self.ours)
            self._cleaned = True

    def taken_listen(self) -> str | None:
        """After a reload that did not take: an address the conf added that another process holds."""
        try:
            candidate = self.conf.read_bytes()
        except FileNotFoundError:
            return None
        return taken_listen(candidate, self.read(), "--verify-listen / verify_listen")

    def read(self) -> bytes | None:
        with contextlib.suppress(FileNotFoundError):
            return self.path.read_bytes()
        with contextlib.suppress(FileNotFoundError):  # first run: what is on disk is what nginx started with
            return self.conf.read_bytes()
        return None

    def remember(self, content: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.path.read_bytes() == content:
                return
        atomic_write(self.path, content)


def remove_leftover_temps(directory: Path, names: tuple[str, ...]) -> list[Path]:
    """Temp files of fsutil.atomic_write (`.<name>.<random>.tmp`) that a killed agent left beside `names`.

    Call at start, before this agent writes there: no other writer of these names runs then."""
    removed = []
    for name in names:
        for leftover in directory.glob(f".{glob_escape(name)}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
                removed.append(leftover)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


# ---------------------------------------------------------------------------------------------- listens

_SERVICE = re.compile(r"^# ---- service (\S+)")
_LISTEN = re.compile(r"^    listen (\S+)((?: \S+)*);$")


def listens(conf: bytes) -> dict[str, tuple[str, bool]]:
    """{listen address: (who set it, reuseport)} of a rendered file: a service's name, or "" for ours."""
    out: dict[str, tuple[str, bool]] = {}
    service = ""
    for line in conf.decode("ascii", "replace").splitlines():
        if (found := _SERVICE.match(line)) is not None:
            service = found.group(1)
        elif line.startswith("# The agent"):
            service = ""
        elif (found := _LISTEN.match(line)) is not None:
            address, flags = found.group(1), found.group(2).split()
            out.setdefault(address, (service, "reuseport" in flags))
    return out


def _bind_error(address: str, reuseport: bool) -> OSError | None:
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - nginx's `listen PORT` binds every IPv4 address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nginx does: TIME_WAIT is no conflict
            if reuseport:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            probe.bind((host, int(port)))
    except OSError as exc:
        return exc
    except ValueError:
        return None
    return None


def taken_listen(candidate: bytes, running: bytes | None, own_flag: str) -> str | None:
    """Why a reload did not take, when an address the candidate added is held by another process.

    nginx reports a failed bind only in its error_log, while the old workers go on serving. Asked after a
    failed verify (not before the reload: the operator's own config may share a port with ours, which only
    nginx itself can tell), and naming what set the address: `own_flag` for the agent's own endpoint."""
    before = listens(running) if running is not None else {}
    for address, (service, reuseport) in listens(candidate).items():
        if address in before:
            continue
        error = _bind_error(address, reuseport)
        if error is not None and error.errno == errno.EADDRINUSE:
            who = f"the listen of service {service} in the rule document" if service else own_flag
            return f"listen {address} is already in use by another process (set by {who})"
    return None
