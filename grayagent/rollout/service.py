"""`grayagent rollout run` as a service: signals, sd_notify, and the controller loop."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from grayagent.rollout.controller import Controller
from grayagent.runtime import sdnotify
from grayagent.runtime.audit import AuditLog
from grayagent.stores.base import Store


def serve(store: Store, interval: float, state_dir: Path | None = None,
          metrics_hosts: frozenset[tuple[str, int | None]] | None = None) -> None:
    """Run the controller until SIGTERM/SIGINT; with `state_dir`, audit its publishes there; with
    `metrics_hosts`, query only those Prometheus hosts."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    audit = None
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        audit = AuditLog(state_dir)
    controller = Controller(store, interval=interval, audit=audit, metrics_hosts=metrics_hosts)

    def ready() -> None:
        sdnotify.notify("READY=1")

    try:
        controller.run(stop, ready=ready)
    finally:
        sdnotify.notify("STOPPING=1")
        store.close()
