"""nginx dynamic mode: reload only for topology changes; push everything else into a shared dict.

apply:
1. write the Lua modules and the skeleton if their bytes changed (`nginx -t` then checks the whole config);
2. push the data to the running nginx's loopback control server (nginx parses and checks it, in an empty
   Lua environment, before storing it). Data is keyed by skeleton fingerprint, so pushing the next
   topology's data before the reload is harmless to the workers that serve now, and the new workers find
   their data at their first request;
3. reload only when the running skeleton's fingerprint differs from the candidate's;
4. verify: the control server reports the candidate's skeleton fingerprint and the pushed data version.
On any failure: the last-good skeleton goes back (reloaded if a reload happened), and the last-good data
is pushed back.

Why upstream-server changes still reload (and balancer_by_lua does not remove that): a balancer_by_lua
upstream would need our own peer selection, health state (max_fails/fail_timeout) and keepalive pooling
(ngx.balancer + a keepalive pool per peer), i.e. reimplementing what nginx's upstream module does well, for
changes that are rare next to rule and weight changes. Reload mode's semantics for server lists stay exact.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from grayagent.errors import UsageError
from grayagent.fsutil import atomic_write
from grayagent.rules.model import Release
from grayagent.targets.base import ApplyResult, RenderedFiles, StepFailed, poll_stable, poll_until
from grayagent.targets.nginx_access_log import AccessLogTailer
from grayagent.targets.nginx_control import TOKEN_FILE, ControlClient, LiveState, ensure_token
from grayagent.targets.nginx_dynamic_render import (
    DATA_FILE,
    DEFAULT_DICT_SIZE,
    LUA_DIR,
    PUSH_PATH,
    VERSION_PATH,
    DynamicOptions,
    data_too_large,
    render,
    skeleton_fingerprint,
)
from grayagent.targets.nginx_process import (
    OLD_WORKERS_GRACE,
    PLACEHOLDER,
    LastGood,
    NginxProcess,
)

LUA_MODE = 0o644  # nginx workers (not root) read the modules; they hold code, no secrets
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9._/-]{1,1000}")  # nginx expands $ in lua_package_path

LAST_GOOD_SKELETON = ".grayagent-skeleton.last-good"  # hidden, no .conf: never included by conf.d/*.conf


@dataclass(frozen=True)
class NginxDynamicSettings:
    conf: Path                                  # the skeleton: the one file the agent owns inside http {}
    main_conf: Path = Path("/etc/nginx/nginx.conf")
    binary: str = "nginx"
    control_listen: str = "127.0.0.1:18089"     # loopback: version (GET) and push (POST) endpoints
    verify_timeout: float = 5.0
    reuseport: bool = False
    dict_size: str = DEFAULT_DICT_SIZE
    access_log: Path | None = None              # JSON access log for rollout figures; None = off


def _check_loopback(listen: str) -> None:
    host = listen.rsplit(":", 1)[0].strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UsageError(f"--verify-listen {listen}: nginx dynamic mode's push endpoint must be on loopback")


class NginxDynamicTarget:
    name = "nginx"

    def __init__(self, settings: NginxDynamicSettings) -> None:
        _check_loopback(settings.control_listen)
        lua_dir = str(settings.conf.parent / LUA_DIR)
        if not _PLAIN_PATH.fullmatch(lua_dir):
            raise UsageError(f"--nginx-conf {settings.conf}: dynamic mode needs a path of [A-Za-z0-9._/-]")
        access_log = str(settings.access_log) if settings.access_log is not None else ""
        if access_log and not _PLAIN_PATH.fullmatch(access_log):
            raise UsageError(f"--nginx-access-log: {access_log}: use an absolute path of [A-Za-z0-9._/-]")
        self.settings = settings
        self.dir = settings.conf.parent
        self.token_path = self.dir / TOKEN_FILE  # made at the first apply: a constructor writes nothing
        self.options = DynamicOptions(lua_dir=lua_dir, control_listen=settings.control_listen,
                                      conf_name=settings.conf.name, reuseport=settings.reuseport,
                                      dict_size=settings.dict_size, access_log=access_log,
                                      token_file=str(self.token_path))
        # The agent starts and stops this; it turns the access log into per-upstream counters.
        self.traffic = AccessLogTailer(settings.access_log) if settings.access_log is not None else None
        self.process = NginxProcess(settings.binary, settings.main_conf)
        self.control = ControlClient(settings.control_listen, VERSION_PATH, PUSH_PATH, self.token_path)
        self.last_good = LastGood(settings.conf, self.dir / LAST_GOOD_SKELETON, (DATA_FILE, TOKEN_FILE))

    def render(self, release: Release, version: int, digest: str) -> RenderedFiles:
        return render(release, version, digest, self.options)

    # ------------------------------------------------------------------ the control server

    def live_state(self) -> LiveState | None:
        return self.control.live_state()

    def live_version(self) -> tuple[int, str] | None:
        """The data version nginx routes with; None after a restart (shared dict empty) or without nginx."""
        state = self.live_state()
        return state.data if state is not None else None

    def _push(self, data: bytes) -> None:
        self.control.push(data)

    # ------------------------------------------------------------------ process work

    def _verify(self, skeleton: str, version: int, digest: str, reloaded: bool = False) -> None:
        def live() -> bool:
            state = self.live_state()
            return state is not None and state.skeleton == skeleton and state.data == (version, digest)

        # After a reload the old workers answer for ~100 ms more (see NginxTarget._verify): require an
        # unbroken window of right answers. A push without a reload is live at its first right answer.
        if poll_stable(live, self.settings.verify_timeout, OLD_WORKERS_GRACE if reloaded else 0.0):
            return
        state = self.live_state()
        shown = (f"skeleton {state.skeleton[:12]}, data {state.data[0] if state.data else 'none'}"
                 if state else "no answer")
        if reloaded:
            taken = self.last_good.taken_listen()
            if taken is not None:
                raise StepFailed(f"nginx serves {shown} after the reload: {taken}")
        raise StepFailed(f"nginx serves {shown}, not skeleton {skeleton[:12]} with version {version}, "
                         f"{self.settings.verify_timeout:.0f}s after apply (see nginx's error_log)")

    def _wait_skeleton(self, fp: str) -> None:
        """After a reload: until the new workers answer (the old ones answer for a moment after SIGHUP)."""
        if not poll_until(lambda: (state := self.live_state()) is not None and state.skeleton == fp,
                          self.settings.verify_timeout):
            taken = self.last_good.taken_listen()
            if taken is not None:
                raise StepFailed(f"nginx does not run skeleton {fp[:12]} after the reload: {taken}")
            raise StepFailed(f"nginx does not run skeleton {fp[:12]} {self.settings.verify_timeout:.0f}s after "
                             "the reload (see nginx's error_log for [emerg], e.g. a failed bind)")

    def _read(self, name: str) -> bytes | None:
        try:
            return (self.dir / name).read_bytes()
        except FileNotFoundError:
            return None

    def apply(self, files: RenderedFiles, version: int, digest: str) -> ApplyResult:
        result = ApplyResult(ok=False)
        conf_name = self.settings.conf.name
        skeleton, data = files[conf_name], files[DATA_FILE]
        fp = skeleton_fingerprint(skeleton)
        if fp is None:
            raise ValueError("not a dynamic-mode skeleton")  # a programming error, not an apply failure
        if (too_large := data_too_large(len(data), self.options)) is not None:
            result.error = too_large  # before anything changes: nothing to restore
            return result
        self.last_good.remove_leftovers_once()
        # The skeleton nginx last verifiably served, never simply what is on disk (see nginx_process.LastGood).
        previous = self.last_good.read()
        last_good = self._read(DATA_FILE)
        try:
            _, new_token = ensure_token(self.token_path)  # nginx's master reads it at its next (re)load
        except OSError as exc:
            result.error = f"cannot write the push token {self.token_path}: {exc}"
            return result
        live = self.live_state()
        if new_token and live is not None:
            live = LiveState("", live.data, live.held)  # nginx holds no (or an old) token: reload to load it
        if previous == skeleton and live is not None and live.skeleton == fp and live.data == (version, digest):
            result.ok = True
            return result
        written = False
        pushed = False  # before the reload
        try:
            if previous != skeleton:
                with result.step("write"):
                    for name, content in files.items():
                        if name.startswith(LUA_DIR + "/") and self._read(name) != content:
                            atomic_write(self.dir / name, content, LUA_MODE)
                    atomic_write(self.settings.conf, skeleton)
                    written = True
                with result.step("check"):
                    self.process.check()
            if live is not None and live.skeleton == fp:
                with result.step("push"):
                    self._push(data)
            else:
                if live is not None:
                    # Gap-free topology change: the running control server stores any skeleton's data (keyed
                    # by fingerprint), so the new workers find theirs at their first request. Best effort:
                    # an older grayagent's Lua may not take this data; then the push follows the reload.
                    with result.step("push"):
                        try:
                            self._push(data)
                            pushed = True
                        except (StepFailed, OSError):
                            pushed = False
                with result.step("reload"):
                    result.reloaded = True
                    self.process.reload()
                    if not pushed:
                        self._wait_skeleton(fp)
                        self._push(data)
            with result.step("verify"):
                self._verify(fp, version, digest, reloaded=result.reloaded)
            atomic_write(self.dir / DATA_FILE, data)
            self.last_good.remember(skeleton)
        except (StepFailed, OSError) as exc:
            result.error = str(exc)
            self._restore(previous if written else False, last_good, result)
            return result
        result.ok = True
        return result

    def _restore(self, previous: bytes | bool | None, last_good: bytes | None, result: ApplyResult) -> None:
        """The last-good skeleton back if it was replaced (False: it was not; None: there was none; reloaded if
        a reload happened), then the last-good data."""
        with result.step("restore"):
            try:
                if previous is not False:
                    atomic_write(self.settings.conf, previous if isinstance(previous, bytes) else PLACEHOLDER)
                if result.reloaded:
                    self.process.reload()
                running = skeleton_fingerprint(previous) if isinstance(previous, bytes) else None
                if result.reloaded and running is not None:
                    self._wait_skeleton(running)
                if last_good is not None and self.live_state() is not None:
                    self._push(last_good)
                result.restored = True
            except (StepFailed, OSError) as exc:
                result.error = f"{result.error}; restoring last-good also failed: {exc}"
