"""Logging: structlog for our own lines, and the standard library's loggers (grpc, the Nacos SDK, watchdog)
routed through the same renderer, so no stray line of another format reaches stderr.

The long-running services (`agent`, `rollout run`) log JSON lines when stderr is not a terminal; the other
commands print human lines, and log only warnings and errors, as `key=value` text.

`Throttle` keeps a repeated warning (a full disk, a store that stays down) from flooding the log.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog


def configure(level: str = "info", json_output: bool | None = None) -> None:
    if json_output is None:
        json_output = not sys.stderr.isatty()
    # gRPC's C core writes its own lines to stderr; only our log should speak there.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer(colors=False))
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # libraries speak only when something is wrong, even at --log-level debug


class Throttle:
    """Lets one line per key through every `every` seconds; the next one that passes says how many were held.

    One helper for every warning that can repeat in a loop: 36,669 identical "could not write status" lines
    in 72 s hide everything else in the log.
    """

    def __init__(self, every: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, emit: Callable[..., Any], event: str, key: str | None = None, **fields: Any) -> bool:
        """emit(event, **fields), unless the same key was emitted less than `every` seconds ago."""
        key = key or event
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.every:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            fields["repeated"] = held
        emit(event, **fields)
        return True

    def reset(self, key: str) -> None:
        """The condition ended: its next occurrence is logged at once."""
        with self._lock:
            self._last.pop(key, None)
            self._held.pop(key, None)
