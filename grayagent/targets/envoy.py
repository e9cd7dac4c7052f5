"""The Envoy target: validate the candidate, swap the LDS/CDS/RDS files in a safe order, confirm each one
through the admin endpoint, and restore the last-good files on any failure.

Envoy watches lds/, cds/ and rds/ under the Envoy dir and re-reads a file when one is renamed into its
directory. Each file carries a version_info (`<version>-<digest>`), which Envoy reports back as the
`version_text` stat once it has accepted the file; a rejected file raises `update_rejected` (or
`update_failure` when it cannot be parsed) and Envoy keeps serving what it had. Every apply rewrites the
routes; listener and cluster files are rewritten only when their resources change, so a rule change
never makes Envoy read, let alone replace, a listener.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from grayagent.fsutil import atomic_write
from grayagent.rules.model import Release
from grayagent.targets.base import ApplyResult, RenderedFiles, StepFailed, http_get, run_command
from grayagent.targets.envoy_render import (
    CDS_FILE,
    LDS_FILE,
    RDS_DIR,
    EnvoyOptions,
    empty_files,
    parse_label,
    rds_file,
    rds_stat,
    render,
    validation_bootstrap,
)
from grayagent.targets.envoy_stats import EnvoyStatsPoller
from grayagent.targets.envoy_validate import DIR_PREFIX as VALIDATE_DIR_PREFIX
from grayagent.targets.envoy_validate import PrewarmedValidator

LDS_STATS = "listener_manager.lds"
log = structlog.get_logger("grayagent.envoy")
VALIDATE_ARGS = ("--disable-hot-restart", "--concurrency", "1", "-l", "error")
CDS_STATS = "cluster_manager.cds"
_STATS_FILTER = (r"^((listener_manager\.lds|cluster_manager\.cds|http\.grayagent_[a-z0-9_]+\.rds\.grayagent_[a-z0-9_]+)"
                 r"\.(version_text|update_attempt|update_rejected|update_failure)"
                 r"|listener_manager\.listener_create_(success|failure)|server\.concurrency"
                 r"|cluster_manager\.warming_clusters)$")
WARMING = "cluster_manager.warming_clusters"
CREATED = "listener_manager.listener_create_success"
UNION_SUFFIX = "+old"  # the label of the transient cluster file that holds old and new clusters
Stats = dict[str, int | str]


@dataclass(frozen=True)
class EnvoySettings:
    envoy_dir: Path                        # lds/, cds/ and rds/ live here; the bootstrap points at them
    admin_url: str = "http://127.0.0.1:9901"
    binary: str = "envoy"
    verify_timeout: float = 10.0           # per file: how long Envoy may take to accept it
    validate_timeout: float = 120.0
    traffic_stats: bool = False            # poll per-cluster stats for rollout figures (agent /metrics, status)
    work_dir: Path | None = None           # validation's temporary files (the agent: <state_dir>/tmp)


def _version_info(content: bytes) -> str:
    label = json.loads(content).get("version_info", "")
    return label if isinstance(label, str) else ""


def _resource_names(content: bytes | None) -> list[str]:
    if content is None:
        return []
    return [str(r.get("name", "")) for r in json.loads(content).get("resources", [])]


def _subscription(path: str) -> str:
    """The stats prefix of the subscription that reads `path`."""
    if path == LDS_FILE:
        return LDS_STATS
    if path == CDS_FILE:
        return CDS_STATS
    return rds_stat(Path(path).stem).removesuffix(".version_text")


def first_error_line(output: str) -> str:
    """The first line of envoy's output worth showing (its [critical] or [error] message), at most 500 characters."""
    lines = [line for line in output.splitlines() if line.strip()]
    for line in lines:
        if "[critical]" in line or "[error]" in line:
            return line.split("] ", 1)[-1].split("]: ", 1)[-1].strip()[:500]
    return lines[-1].strip()[:500] if lines else "no output"


class EnvoyTarget:
    name = "envoy"

    def __init__(self, settings: EnvoySettings) -> None:
        self.settings = settings
        self.dir = settings.envoy_dir.absolute()
        self.options = EnvoyOptions(envoy_dir=str(self.dir))
        # The agent starts and stops this; per-upstream request, 5xx and latency figures from the admin stats.
        self.traffic = EnvoyStatsPoller(settings.admin_url) if settings.traffic_stats else None
        self._validator: PrewarmedValidator | None = None  # started on first use, then kept one step ahead
        self._cleaned = False
        # Never inside envoy_dir: the validator's FIFOs would block anyone who reads every file there.
        self.work_dir = (settings.work_dir if settings.work_dir is not None
                         else self.dir.parent / f".{self.dir.name}.grayagent-tmp")

    def render(self, release: Release, version: int, digest: str) -> RenderedFiles:
        return render(release, version, digest, self.options)

    # ------------------------------------------------------------------ files

    def prepare(self) -> None:
        """Create the watched directories, and empty LDS/CDS files if there are none (Envoy needs them)."""
        for sub in ("lds", "cds", RDS_DIR):
            (self.dir / sub).mkdir(parents=True, exist_ok=True, mode=0o750)
            if not self._cleaned:  # these directories are ours alone: a killed agent's temp files go
                for leftover in (self.dir / sub).glob(".*.tmp"):
                    leftover.unlink(missing_ok=True)
        self._cleaned = True
        for path, content in empty_files().items():
            if not (self.dir / path).exists():
                atomic_write(self.dir / path, content)

    def installed(self) -> dict[str, bytes]:
        """The files Envoy reads now (ours only: no temp files)."""
        out: dict[str, bytes] = {}
        for path in (LDS_FILE, CDS_FILE):
            with contextlib.suppress(FileNotFoundError):
                out[path] = (self.dir / path).read_bytes()
        with contextlib.suppress(FileNotFoundError):
            for entry in sorted((self.dir / RDS_DIR).iterdir()):
                if entry.name.endswith(".json") and not entry.name.startswith("."):
                    out[f"{RDS_DIR}/{entry.name}"] = entry.read_bytes()
        return out

    # ------------------------------------------------------------------ admin

    def _stats(self) -> Stats:
        url = f"{self.settings.admin_url.rstrip('/')}/stats?format=json&filter={urllib.parse.quote(_STATS_FILTER)}"
        try:
            status, body = http_get(url, timeout=2.0)
        except OSError as exc:
            raise StepFailed(f"envoy admin {self.settings.admin_url} unreachable: {exc}") from None
        if status != 200:
            raise StepFailed(f"envoy admin answered {status} for /stats")
        try:
            entries = json.loads(body).get("stats", [])
        except ValueError:
            raise StepFailed("envoy admin /stats did not answer JSON") from None
        return {e["name"]: e["value"] for e in entries if "name" in e and "value" in e}

    def _await_warm(self) -> Stats:
        deadline = time.monotonic() + self.settings.verify_timeout
        while True:
            stats = self._stats()
            if int(stats.get(WARMING, 0) or 0) == 0:
                return stats
            if time.monotonic() > deadline:
                raise StepFailed(f"envoy: {stats.get(WARMING)} clusters still warming after "
                                 f"{self.settings.verify_timeout:.0f}s")
            time.sleep(0.01)

    def live_version(self) -> tuple[int, str] | None:
        """The version Envoy serves: every file in place is accepted, and every listener's routes carry it.

        Routes are rewritten by every apply; listeners and clusters only when they change, so their files
        may carry an older label."""
        try:
            stats = self._stats()
            files = self.installed()
            return self._live(stats, files)
        except (StepFailed, OSError, ValueError):
            return None

    def _live(self, stats: Stats, files: Mapping[str, bytes]) -> tuple[int, str] | None:
        if LDS_FILE not in files or CDS_FILE not in files:
            return None
        for path in (LDS_FILE, CDS_FILE):
            label = _version_info(files[path])
            if label.endswith(UNION_SUFFIX) or stats.get(f"{_subscription(path)}.version_text") != label:
                return None  # mid-apply: the clusters of both versions are still in place
        labels: set[str] = set()
        for name in _resource_names(files[LDS_FILE]):
            content = files.get(rds_file(name))
            if content is None or stats.get(rds_stat(name)) != _version_info(content):
                return None
            labels.add(_version_info(content))
        return parse_label(labels.pop()) if len(labels) == 1 else None

    def effective(self, previous: Mapping[str, bytes], files: RenderedFiles) -> dict[str, bytes]:
        """What to put in place: `files`, but the listener and cluster files stay as they are when only
        their version label would change, so a rule change makes Envoy read nothing but routes."""
        out = dict(files)
        for path in (LDS_FILE, CDS_FILE):
            old = previous.get(path)
            with contextlib.suppress(ValueError):  # an unreadable file in place is simply replaced
                if old is not None and json.loads(old).get("resources") == json.loads(files[path])["resources"]:
                    out[path] = old
        return out

    # ------------------------------------------------------------------ steps

    def _validate(self, files: RenderedFiles) -> None:
        if self._validator is None:
            self._validator = PrewarmedValidator(self.settings.binary, VALIDATE_ARGS, self.settings.validate_timeout,
                                                 self.work_dir)
        try:
            code, output = self._validator.validate(validation_bootstrap(files))
        except OSError as exc:
            # The pre-started validator could not be used: validate the slow way rather than not at all.
            log.warning("pre-started envoy validator unusable; validating cold", error=str(exc))
            code, output = self._validate_cold(files)
        if code != 0:
            raise StepFailed(f"envoy --mode validate failed: {first_error_line(output)}")

    def _validate_cold(self, files: RenderedFiles) -> tuple[int, str]:
        self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        candidate = self.work_dir / f"{VALIDATE_DIR_PREFIX}{os.getpid()}.json"  # a leftover is removed by pid
        try:
            atomic_write(candidate, validation_bootstrap(files))
            done = run_command([self.settings.binary, "--mode", "validate", "-c", str(candidate), *VALIDATE_ARGS],
                               timeout=self.settings.validate_timeout)
        finally:
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
        return done.returncode, done.stderr + done.stdout

    def _write_and_confirm(self, path: str, content: bytes, before: Stats | None) -> Stats:
        """Rename `content` into place and wait until its subscription has read and accepted it.

        `before`: stats read since the previous write, if any (saves a round trip). Returns the last stats
        read, which serve as `before` for the next write."""
        if before is None:
            before = self._stats()
        atomic_write(self.dir / path, content)
        return self._await(_subscription(path), _version_info(content), before)

    def _await(self, sub: str, label: str, before: Stats | None) -> Stats:
        """Wait until subscription `sub` reports `label`. With `before`, it must also have re-read the file
        since then (the label alone cannot tell a re-apply of the same version), and not rejected it."""
        deadline = time.monotonic() + self.settings.verify_timeout
        seen: Stats = {}
        while True:
            with contextlib.suppress(StepFailed):
                seen = self._stats()
            if before is not None:
                for counter, what in (("update_rejected", "rejected"), ("update_failure", "could not read")):
                    if int(seen.get(f"{sub}.{counter}", 0)) > int(before.get(f"{sub}.{counter}", 0)):
                        raise StepFailed(f"envoy {what} {sub.split('.')[-1] if sub.startswith('http.') else sub} "
                                         f"version {label} ({sub}.{counter}; see envoy's log)")
            attempted = before is None or (int(seen.get(f"{sub}.update_attempt", 0))
                                           > int(before.get(f"{sub}.update_attempt", 0)))
            if attempted and seen.get(f"{sub}.version_text") == label:
                return seen
            if time.monotonic() >= deadline:
                shown = seen.get(f"{sub}.version_text", "nothing")
                raise StepFailed(f"envoy did not accept {sub} version {label} within "
                                 f"{self.settings.verify_timeout:.0f}s (it reports {shown})")
            time.sleep(0.002)

    def _await_workers(self, old: bytes | None, new: bytes, before: Stats) -> None:
        """An accepted listener accepts connections only once every worker has added it (a new listener's
        socket is refused until then): wait for one listener_create_success per changed listener and worker."""
        old_listeners = {r["name"]: r for r in json.loads(old).get("resources", [])} if old else {}
        changed = [r for r in json.loads(new)["resources"] if old_listeners.get(r["name"]) != r]
        if not changed:
            return
        workers = int(before.get("server.concurrency", 1)) or 1
        want = int(before.get(CREATED, 0)) + len(changed) * workers
        deadline = time.monotonic() + self.settings.verify_timeout
        while True:
            seen = self._stats()
            if int(seen.get("listener_manager.listener_create_failure", 0)) > \
                    int(before.get("listener_manager.listener_create_failure", 0)):
                raise StepFailed("envoy failed to start a listener on its workers (listener_create_failure)")
            if int(seen.get(CREATED, 0)) >= want:
                return
            if time.monotonic() >= deadline:
                raise StepFailed(f"envoy workers did not start {len(changed)} listener(s) within "
                                 f"{self.settings.verify_timeout:.0f}s")
            time.sleep(0.002)

    def _install(self, old: Mapping[str, bytes], new: Mapping[str, bytes]) -> None:
        """Move Envoy from `old` files to `new` so that no route ever names a cluster Envoy lacks:
        clusters (old and new together) -> routes -> listeners -> routes of new listeners -> drop the rest."""
        old_clusters = set(_resource_names(old.get(CDS_FILE)))
        new_clusters = set(_resource_names(new[CDS_FILE]))
        cds = new[CDS_FILE]
        if old_clusters - new_clusters:
            # Old routes still name the removed clusters until the new routes are in.
            union = json.loads(old[CDS_FILE])["resources"] + json.loads(new[CDS_FILE])["resources"]
            merged = {c["name"]: c for c in union}
            cds = json.dumps({"version_info": _version_info(new[CDS_FILE]) + UNION_SUFFIX,
                              "resources": [merged[k] for k in sorted(merged)]}, sort_keys=True).encode()
        stats: Stats | None = None
        if old.get(CDS_FILE) != cds:
            stats = self._write_and_confirm(CDS_FILE, cds, stats)
            # Accepted is not ready: RDS accepts routes to warming clusters, whose requests get 503 until
            # warming ends (a new DNS upstream's first resolution). Routes go in only once all are warm.
            stats = self._await_warm()
        old_listeners = set(_resource_names(old.get(LDS_FILE)))
        later: list[str] = []
        for path, content in new.items():
            if not path.startswith(RDS_DIR + "/") or old.get(path) == content:
                continue
            if Path(path).stem in old_listeners:
                stats = self._write_and_confirm(path, content, stats)
            else:
                atomic_write(self.dir / path, content)  # read when LDS creates its listener
                later.append(path)
        if old.get(LDS_FILE) != new[LDS_FILE]:
            before = stats if stats is not None else self._stats()
            self._write_and_confirm(LDS_FILE, new[LDS_FILE], before)
            self._await_workers(old.get(LDS_FILE), new[LDS_FILE], before)
        for path in later:  # a new listener reads its routes when it is created
            self._await(_subscription(path), _version_info(new[path]), None)
        for path in old:
            if path.startswith(RDS_DIR + "/") and path not in new:
                (self.dir / path).unlink(missing_ok=True)
        if cds != new[CDS_FILE]:
            self._write_and_confirm(CDS_FILE, new[CDS_FILE], None)

    def apply(self, files: RenderedFiles, version: int, digest: str) -> ApplyResult:
        result = ApplyResult(ok=False)
        try:
            self.prepare()
            previous = self.installed()
        except OSError as exc:
            result.error = f"cannot read {self.dir}: {exc}"
            return result
        files = self.effective(previous, files)
        if previous == files and self.live_version() == (version, digest):
            result.ok = True
            return result
        try:
            with result.step("validate"):
                self._validate(files)
        except (StepFailed, OSError) as exc:
            result.error = str(exc)  # nothing was touched
            return result
        try:
            with result.step("swap"):
                result.reloaded = True
                self._install(previous, files)
            with result.step("verify"):
                live = self.live_version()
                if live != (version, digest):
                    raise StepFailed(f"envoy accepted every file but reports version {live[0] if live else None}")
        except (StepFailed, OSError, ValueError) as exc:
            result.error = str(exc)
            self._restore(previous, result)
            return result
        result.ok = True
        return result

    def _restore(self, previous: dict[str, bytes], result: ApplyResult) -> None:
        """Put the last-good files back, in the same safe order, and wait until Envoy serves them again."""
        if CDS_FILE not in previous or LDS_FILE not in previous:
            previous = {**previous, **empty_files()}
        with result.step("restore"):
            try:
                # From whatever mix is in place now: the failed attempt's files up to where it stopped.
                self._install(self.installed(), previous)
                result.restored = True
            except (StepFailed, OSError, ValueError) as exc:
                result.error = f"{result.error}; restoring last-good also failed: {exc}"
