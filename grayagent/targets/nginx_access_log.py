"""nginx's traffic figures: the renderer writes one JSON line per request (nginx_render.ACCESS_LOG_FORMAT) to
a host-chosen file; `AccessLogTailer` follows that file from its own thread (never the agent's loop) and
survives rotation: it reopens when the path points to a new inode or the file shrank (copytruncate).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import structlog

from grayagent.targets.traffic import UPSTREAM_PREFIX, BackgroundSampler, TrafficCounters

log = structlog.get_logger("grayagent.traffic")


def parse_line(line: bytes) -> tuple[str, str, int, float] | None:
    """(service, upstream, status, seconds) from one access log line, or None for lines that are not ours."""
    try:
        entry = json.loads(line)
        proxied = str(entry["u"])
        if not proxied.startswith(UPSTREAM_PREFIX):
            return None
        service, _, upstream = proxied[len(UPSTREAM_PREFIX):].partition(".")
        status = int(entry["st"])
        seconds = _seconds(str(entry.get("urt", "")))
        if seconds is None:
            seconds = float(entry.get("rt", 0))
    except (ValueError, KeyError, TypeError):
        return None
    return (service, upstream, status, seconds) if service and upstream else None


def _seconds(text: str) -> float | None:
    """$upstream_response_time: "0.012", or "0.010, 0.002 : 0.003" after retries (summed), or "-"."""
    total, seen = 0.0, False
    for part in text.replace(":", ",").split(","):
        part = part.strip()
        if part and part != "-":
            try:
                total += float(part)
                seen = True
            except ValueError:
                return None
    return total if seen else None


class AccessLogTailer(BackgroundSampler):
    """Follows one access log file from its own thread and feeds `counters`."""

    thread_name = "access-log-tail"

    def __init__(self, path: Path, counters: TrafficCounters | None = None, poll: float = 0.1) -> None:
        super().__init__()
        self.path = path
        self.counters = counters or TrafficCounters()
        self.poll = poll

    def _feed(self, data: bytes) -> None:
        for line in data.split(b"\n"):
            parsed = parse_line(line) if line.strip() else None
            if parsed is not None:
                self.counters.observe(*parsed)

    def _run(self) -> None:
        fd: int | None = None
        inode = -1
        position = 0
        partial = b""
        first = True
        try:
            while not self._stop.is_set():
                if fd is None:
                    try:
                        fd = os.open(self.path, os.O_RDONLY)
                    except OSError:
                        first = False  # a file that appears later is read from its start
                        self._stop.wait(self.poll)
                        continue
                    st = os.fstat(fd)
                    inode = st.st_ino
                    # Lines written before the agent started belong to no window the controller will ask about.
                    position = st.st_size if first else 0
                    first = False
                    partial = b""
                chunk = os.pread(fd, 1 << 20, position)
                if chunk:
                    position += len(chunk)
                    data = partial + chunk
                    cut = data.rfind(b"\n") + 1
                    self._feed(data[:cut])
                    partial = data[cut:]
                    continue
                try:
                    st = os.stat(self.path)
                    rotated = st.st_ino != inode
                    truncated = not rotated and st.st_size < position
                except OSError:
                    rotated, truncated = True, False
                if rotated or truncated:
                    # Renamed away: the old fd was drained above. Truncated: the rest is gone; start over.
                    os.close(fd)
                    fd = None
                    continue
                self._stop.wait(self.poll)
        except Exception as exc:  # the agent must keep running without figures rather than die
            log.error("access log tailer stopped", path=str(self.path), error=str(exc))
        finally:
            if fd is not None:
                os.close(fd)
