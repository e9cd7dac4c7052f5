"""The nginx target: render one include file, then check -> swap -> reload -> verify, restoring on failure."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from grayagent.errors import UsageError
from grayagent.fsutil import atomic_write
from grayagent.rules.model import Release
from grayagent.targets.base import ApplyResult, RenderedFiles, StepFailed, http_get, poll_stable
from grayagent.targets.nginx_access_log import AccessLogTailer
from grayagent.targets.nginx_process import (
    OLD_WORKERS_GRACE,
    PLACEHOLDER,
    LastGood,
    NginxProcess,
)
from grayagent.targets.nginx_render import VERSION_PATH, NginxOptions, render
from grayagent.text import is_decimal


@dataclass(frozen=True)
class NginxSettings:
    conf: Path                                  # the one file the agent owns, included inside http {}
    main_conf: Path = Path("/etc/nginx/nginx.conf")
    binary: str = "nginx"
    verify_listen: str = "127.0.0.1:18089"
    verify_timeout: float = 5.0
    reuseport: bool = False
    access_log: Path | None = None              # JSON access log for rollout figures; None = off


class NginxTarget:
    name = "nginx"

    def __init__(self, settings: NginxSettings) -> None:
        self.settings = settings
        access_log = ""
        if settings.access_log is not None:
            access_log = str(settings.access_log)
            if not re.fullmatch(r"/[A-Za-z0-9._/-]{1,1000}", access_log):  # nginx would expand $ in a path
                raise UsageError(f"--nginx-access-log: {access_log}: use an absolute path of [A-Za-z0-9._/-]")
        self.options = NginxOptions(verify_listen=settings.verify_listen, reuseport=settings.reuseport,
                                    access_log=access_log)
        # The agent starts and stops this; it turns the access log into per-upstream counters.
        self.traffic = AccessLogTailer(settings.access_log) if settings.access_log is not None else None
        self.process = NginxProcess(settings.binary, settings.main_conf)
        # Beside the conf, hidden and without .conf, so an `include conf.d/*.conf` never loads it.
        self.last_good = LastGood(settings.conf, settings.conf.with_name(f".{settings.conf.name}.last-good"))

    def render(self, release: Release, version: int, digest: str) -> RenderedFiles:
        return {self.settings.conf.name: render(release, version, digest, self.options).encode("utf-8")}

    # ------------------------------------------------------------------ process work

    def live_version(self) -> tuple[int, str] | None:
        try:
            status, body = http_get(f"http://{self.settings.verify_listen}{VERSION_PATH}")
        except OSError:
            return None
        parts = body.split()
        if status != 200 or len(parts) != 2 or not is_decimal(parts[0]):
            return None
        return int(parts[0]), parts[1]

    def _verify(self, version: int, digest: str) -> None:
        """Live means the old config stopped answering, not just that a new worker did: nginx's master
        sleeps 100 ms before retiring the old workers, which accept connections until then. So after the
        first sighting, every answer for OLD_WORKERS_GRACE seconds must be the new version."""
        if poll_stable(lambda: self.live_version() == (version, digest), self.settings.verify_timeout,
                       OLD_WORKERS_GRACE):
            return
        live = self.live_version()
        shown = f"version {live[0]}" if live else "no version"
        taken = self.last_good.taken_listen()
        if taken is not None:
            raise StepFailed(f"nginx still serves {shown} after reload: {taken}")
        raise StepFailed(f"nginx still serves {shown} {self.settings.verify_timeout:.0f}s after reload "
                         f"(see nginx's error_log for [emerg], e.g. a failed bind)")

    def apply(self, files: RenderedFiles, version: int, digest: str) -> ApplyResult:
        result = ApplyResult(ok=False)
        conf = self.settings.conf
        candidate = files[conf.name]
        self.last_good.remove_leftovers_once()
        previous = self.last_good.read()
        try:
            on_disk: bytes | None = conf.read_bytes()
        except FileNotFoundError:
            on_disk = None
        if on_disk == candidate and self.live_version() == (version, digest):
            self.last_good.remember(candidate)
            result.ok = True
            return result
        try:
            # nginx reads its files only on reload, so the candidate can sit in place while nginx -t checks
            # the whole config exactly as the master will load it.
            with result.step("write"):
                atomic_write(conf, candidate)
            with result.step("check"):
                self.process.check()
            with result.step("reload"):
                result.reloaded = True
                self.process.reload()
            with result.step("verify"):
                self._verify(version, digest)
        except (StepFailed, OSError) as exc:
            result.error = str(exc)
            self._restore(previous, result)
            return result
        self.last_good.remember(candidate)
        result.ok = True
        return result

    def _restore(self, previous: bytes | None, result: ApplyResult) -> None:
        """Put the last-good file back; reload again only if the failed attempt got as far as reloading."""
        with result.step("restore"):
            try:
                atomic_write(self.settings.conf, previous if previous is not None else PLACEHOLDER)
                if result.reloaded:
                    self.process.reload()
                result.restored = True
            except (StepFailed, OSError) as exc:
                result.error = f"{result.error}; restoring last-good also failed: {exc}"
