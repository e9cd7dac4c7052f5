"""`envoy --mode validate`, started one step ahead so that validating a candidate costs no process start.

A cold `envoy --mode validate` spends most of its time starting the ~100 MB binary: 40-60 ms on an idle
2-core machine, about 120 ms under load, against 17 ms to check the config itself. So the next validator
is started in advance and blocks opening its bootstrap, a FIFO in a private directory; validating writes
the candidate into the FIFO and reads the verdict. The waiting process dies with the agent
(PR_SET_PDEATHSIG), and any trouble with it falls back to a cold run.

The private directory lives under the agent's work dir (its state dir), never the system temp dir: it is
removed on close, when the validator is collected or the interpreter exits, and, after a kill -9, by the
next validator that starts there (a directory whose pid is gone is a leftover).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

from grayagent.text import is_decimal

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


DIR_PREFIX = "envoy-validate-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(work_dir: Path) -> list[Path]:
    """Validator directories (and cold-validation files) of processes that are gone: a crash's leftovers."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in work_dir.iterdir():
            if not entry.name.startswith(DIR_PREFIX):
                continue
            pid = entry.name.removeprefix(DIR_PREFIX).split("-", 1)[0].split(".", 1)[0]
            if is_decimal(pid) and not _alive(int(pid)):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def _remove_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class PrewarmedValidator:
    def __init__(self, binary: str, extra_args: Sequence[str], timeout: float, work_dir: Path) -> None:
        self.binary = binary
        self.extra_args = list(extra_args)
        self.timeout = timeout
        work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_leftovers(work_dir)
        # 0700: nobody else writes it. The pid in the name tells a later start whether it is a leftover.
        self._dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=work_dir))
        self._finalizer = weakref.finalize(self, _remove_dir, self._dir)
        self._lock = threading.Lock()
        self._count = 0
        self._ready: tuple[subprocess.Popen[bytes], Path] | None = None

    def _spawn(self) -> tuple[subprocess.Popen[bytes], Path]:
        self._count += 1
        fifo = self._dir / f"candidate-{self._count}.json"  # Envoy picks the format from the extension
        os.mkfifo(fifo, 0o600)
        proc = subprocess.Popen([self.binary, "--mode", "validate", "-c", str(fifo), *self.extra_args],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        return proc, fifo

    def prewarm(self) -> None:
        with self._lock:
            if self._ready is None or self._ready[0].poll() is not None:
                self._discard()
                self._ready = self._spawn()

    def _discard(self) -> None:
        if self._ready is not None:
            proc, fifo = self._ready
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            fifo.unlink(missing_ok=True)
            self._ready = None

    def validate(self, candidate: bytes) -> tuple[int, str]:
        """(exit code, output) of `envoy --mode validate` on `candidate`."""
        with self._lock:
            if self._ready is None or self._ready[0].poll() is not None:
                self._discard()
                self._ready = self._spawn()
            proc, fifo = self._ready
            self._ready = None
        try:
            try:
                self._feed(proc, fifo, candidate)
            except OSError:
                proc.kill()  # never leave a validator behind that nobody will read or reap
                proc.wait()
                raise
            output, _ = proc.communicate(timeout=self.timeout)
            return proc.returncode, output.decode("utf-8", "replace")
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return 124, f"envoy --mode validate timed out after {self.timeout:.0f}s"
        finally:
            fifo.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.prewarm()  # the next candidate finds its validator already started

    def _feed(self, proc: subprocess.Popen[bytes], fifo: Path, candidate: bytes) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                # Non-blocking open fails with ENXIO until Envoy opens its end: never wait on a dead reader.
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as exc:
                if exc.errno != errno.ENXIO or proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.001)
        try:
            view = memoryview(candidate)
            while view:
                # Non-blocking writes against the same deadline: a reader that stalls cannot hang the apply.
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise OSError(errno.ETIMEDOUT, "envoy validator stopped reading its config") from None
                    select.select([], [fd], [], 0.05)
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            self._discard()
        self._finalizer()
