"""`grayagent rollout run` as a service: signals, sd_notify, and the controller loop."""

from __future__ import annotations

import signal
import threading

from grayagent import sdnotify
from grayagent.rollout.controller import Controller
from grayagent.stores.base import Store


def serve(store: Store, interval: float) -> None:
    """Run the controller until SIGTERM/SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    controller = Controller(store, interval=interval)

    def ready() -> None:
        sdnotify.notify("READY=1")

    try:
        controller.run(stop, ready=ready)
    finally:
        sdnotify.notify("STOPPING=1")
        store.close()
