"""One function per CLI verb (the agent service and rollouts have their own modules). The CLI parses flags
and prints; everything else happens here."""

from __future__ import annotations

import difflib
import ipaddress
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from grayagent.errors import InvalidDocument, Problem, UsageError
from grayagent.fsutil import atomic_write
from grayagent.rules.docload import loads_json
from grayagent.rules.idlists import read_document as read_file
from grayagent.rules.model import Release, parse_document
from grayagent.rules.routing import Decision, Request, route
from grayagent.runtime import audit
from grayagent.runtime.cache import cached_versions
from grayagent.runtime.fleet import fleet_status as fleet_status  # `grayagent status` calls it here
from grayagent.runtime.state import StateDir
from grayagent.stores import Store
from grayagent.stores.base import VersionMeta, VersionRecord
from grayagent.stores.chain import ChainBreak, require_intact, verify_chain
from grayagent.targets.base import Target


def validate_files(paths: Iterable[str]) -> list[Problem]:
    """Every problem in every file; empty when all are valid."""
    problems: list[Problem] = []
    for path in paths:
        try:
            parse_document(read_file(path), path)
        except InvalidDocument as exc:
            problems.extend(exc.problems)
    return problems


def publish(store: Store, path: str, author: str, message: str, expected: int | None,
            checks: Sequence[tuple[str, str | None]] = ()) -> VersionMeta:
    """Validate, run each (proxy, binary) check the caller asked for, then publish with compare-and-set."""
    content = read_file(path)
    release = parse_document(content, path)
    if checks:
        from grayagent import proxycheck  # imports the renderers: only when asked

        for proxy, binary in checks:
            proxycheck.check(release, path, proxy, binary)
    if expected is None:
        expected = store.current_number()  # the pointer alone: a damaged current version must not block a fix
    return store.publish(content, expected, author, message)


def history(store: Store) -> list[VersionMeta]:
    return store.history()


def show(store: Store, version: int | None) -> VersionRecord:
    if version is None:
        record = store.current()
        if record is None:
            raise UsageError(f"{store.url}: nothing has been published yet")
        return record
    return store.get(version)


def diff(store: Store, a: int, b: int) -> str:
    old, new = store.get(a), store.get(b)
    lines = difflib.unified_diff(old.content.decode("utf-8").splitlines(keepends=True),
                                 new.content.decode("utf-8").splitlines(keepends=True),
                                 fromfile=f"version {a}", tofile=f"version {b}")
    return "".join(lines)


def revert(store: Store, version: int, author: str, message: str | None) -> VersionMeta:
    """Publish a new version whose content equals `version`; history stays append-only.

    A version the history chain shows as possibly edited is refused: a revert must not republish a forgery.
    The current version is not read, only the pointer's number for compare-and-set: a damaged current
    version is exactly what a revert must be able to replace."""
    old = require_intact(store, version)
    parse_document(old.content, f"{store.url}#{version}")
    return store.publish(old.content, store.current_number(), author, message or f"revert to version {version}")


def history_breaks(store: Store) -> list[ChainBreak]:
    return verify_chain(store)


def load_release(store: Store | None, version: int | None, file: str | None) -> Release:
    if file is not None:
        return parse_document(read_file(file), file)
    assert store is not None
    record = show(store, version)
    return parse_document(record.content, f"{store.url}#{record.version}")


def route_one(release: Release, service: str, request: Request) -> Decision:
    try:
        svc = release.service(service)
    except KeyError:
        names = ", ".join(s.name for s in release.services)
        raise UsageError(f"--service: no service {service!r} (services: {names})") from None
    if request.source_ip:
        try:  # routing reads an unparsable address as "no address", which would answer a question not asked
            ipaddress.ip_address(request.source_ip)
        except ValueError:
            raise UsageError(f"--source-ip: {request.source_ip!r} is not an IP address") from None
    return route(svc, request)


def _request_from_json(data: Any, where: str) -> tuple[str, Request]:
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a JSON object")
    service = data.get("service")
    if not isinstance(service, str):
        raise UsageError(f"{where}: service: missing or not a string")
    for key in ("headers", "cookies", "query"):
        value = data.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in value.items()):
            raise UsageError(f"{where}: {key}: expected an object of strings")
    for key in ("path", "source_ip", "query_string"):
        if key in data and not isinstance(data[key], str):
            raise UsageError(f"{where}: {key}: expected a string")
    query: dict[str, str] | str = data.get("query") or data.get("query_string", "")
    request = Request.build(headers=data.get("headers"), cookies=data.get("cookies"), query=query,
                            path=data.get("path"), source_ip=data.get("source_ip"))
    return service, request


def route_batch(release: Release, lines: Iterable[str], source: str) -> Iterator[dict[str, Any]]:
    """JSON lines in, one decision per line out. A bad line yields an error object, not an abort."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            service, request = _request_from_json(loads_json(line), where)
            yield route_one(release, service, request).as_dict()
        except ValueError as exc:
            yield {"error": f"{where}: invalid JSON: {exc}"}
        except UsageError as exc:
            yield {"error": str(exc) if str(exc).startswith(where) else f"{where}: {exc}"}


def _audit_log(state_dir: Path) -> StateDir:
    """The state dir of an existing audit log; a mistyped path or a dir without a log is a usage mistake."""
    state = StateDir(state_dir).existing()
    if not state.audit.exists():
        raise UsageError(f"--state-dir: {state_dir}: no audit log there")
    return state


def audit_entries(state_dir: Path) -> list[dict[str, Any]]:
    _audit_log(state_dir)
    try:
        return audit.read_entries(state_dir)
    except FileNotFoundError:
        raise UsageError(f"--state-dir: {state_dir}: no audit log there") from None
    except ValueError as exc:
        raise InvalidDocument([Problem(str(StateDir(state_dir).audit), "", f"not JSON lines: {exc}")]) from None


def audit_verify(state_dir: Path) -> list[str]:
    """Problems in the log's chain; a state dir that does not exist is a usage mistake, not a lost log."""
    return audit.verify(StateDir(state_dir).existing().root)


def audit_ack(state_dir: Path, reason: str, operator: str) -> dict[str, Any]:
    """Acknowledge every gap recorded so far, with an audited `ack` entry."""
    return audit.AuditLog(_audit_log(state_dir).root).acknowledge(reason, operator)


def wait_for_convergence(store: Store, seconds: float, min_agents: int = 1, poll: float = 0.5) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        status = fleet_status(store, min_agents)
        if status["converged"] or time.monotonic() >= deadline:
            return status
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


def local_versions(state_dir: Path, store_url: str | None = None) -> list[dict[str, Any]]:
    """What a break-glass revert can restore: the versions this host applied recently from that store."""
    from grayagent.runtime.agent import read_pin

    pin = read_pin(StateDir(state_dir).existing().root)
    return [{**r.meta.as_dict(), "pinned": bool(pin and pin.get("version") == r.version)}
            for r in cached_versions(state_dir, store_url)]


def local_revert(state_dir: Path, target: Target, version: int, reason: str,
                 store_url: str | None = None) -> dict[str, Any]:
    """Break-glass: apply a version from this host's cache straight to the proxy and pin it.

    For when the store is down or serving a bad version. The pin stops the agent from applying store
    versions until `unpin`; publish a proper `grayagent revert` once the store is back, then unpin.
    """
    state = StateDir(state_dir).existing()
    records = {r.version: r for r in cached_versions(state_dir, store_url)}
    if version not in records:
        known = ", ".join(map(str, sorted(records))) or "none"
        raise UsageError(f"version {version} is not in {state.cache_dir} (cached: {known})")
    record = records[version]
    digest = record.meta.digest
    release = parse_document(record.content, f"{state.cache_dir}#{version}")
    pin = {"version": version, "digest": digest, "reason": reason, "pinned_by": "grayagent local-revert"}
    previous_pin = state.pin.read_bytes() if state.pin.exists() else None
    atomic_write(state.pin, json.dumps(pin).encode())  # first, so a running agent cannot interleave
    result = target.apply(target.render(release, version, digest), version, digest)
    audit.AuditLog(state.root).append("break-glass", version=version, digest=digest, target=target.name,
                                      reason=reason, result="ok" if result.ok else "failed",
                                      steps_ms=result.steps_ms, error=result.error)
    if not result.ok:
        if previous_pin is None:
            state.pin.unlink(missing_ok=True)
        else:
            atomic_write(state.pin, previous_pin)
        raise UsageError(f"local revert to version {version} failed: {result.error}")
    return pin


def unpin(state_dir: Path) -> bool:
    """Let the agent follow the store again; False when nothing was pinned."""
    state = StateDir(state_dir).existing()
    if not state.pin.exists():
        return False
    state.pin.unlink()
    audit.AuditLog(state.root).append("unpin")
    return True
