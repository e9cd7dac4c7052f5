"""systemd's notify protocol (READY=1, WATCHDOG=1, STATUS=...): one datagram to $NOTIFY_SOCKET.

Fifteen lines of protocol do not justify a dependency: python-systemd needs libsystemd headers to build,
and the protocol is stable and documented in sd_notify(3).
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send `state` to systemd; False when not running under a notify-type unit."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        # Never block the agent on a notification: a full queue (nobody reading) just drops it.
        sock.setblocking(False)
        try:
            sock.connect(address)
            sock.send(state.encode())
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd asked for, in seconds; None when no watchdog is set for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2
