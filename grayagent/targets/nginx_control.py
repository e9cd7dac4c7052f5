"""The agent's side of nginx dynamic mode's loopback control server: read what nginx routes with, and push
routing data to it, signed.

The push secret lives in one file, 0600, beside the skeleton. nginx's master reads it at init
(init_by_lua in the skeleton names the file, never the secret), so neither the rendered files, the
last-good copies nor `nginx -T` hold it. A push carries no secret either: it carries an HMAC-SHA1 over
its epoch and body, so a captured push can be replayed but not altered.

Replay: nginx refuses a push whose (epoch, version) is lower than the one it holds. The store's versions
only grow (a revert publishes a new, higher one), so the epoch stays put, until this agent goes back on
purpose (a local revert or pin to an older version, or restoring last-good after a failed push): then it
pushes with the held epoch + 1, which only a holder of the secret can sign.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from grayagent.fsutil import atomic_write
from grayagent.targets.base import StepFailed, http_get
from grayagent.text import is_decimal

TOKEN_FILE = ".grayagent-control-token"  # noqa: S105 - the file's name; the token is generated
TOKEN_MODE = 0o600
_TOKEN = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LiveState:
    skeleton: str
    data: tuple[int, str] | None        # (version, digest) the answering worker routes with
    held: tuple[int, int] = (0, 0)      # (epoch, version): the highest push nginx accepted


def read_token(path: Path) -> str | None:
    try:
        token = path.read_text("ascii").strip()
    except FileNotFoundError:
        return None
    return token if _TOKEN.fullmatch(token) else None


def ensure_token(path: Path) -> tuple[str, bool]:
    """This host's push secret, made once (readable by root only) and kept across agent restarts; and
    whether it was made now (a running nginx then still holds the old one, until a reload)."""
    token = read_token(path)
    if token is not None:
        return token, False
    token = secrets.token_hex(32)
    atomic_write(path, token.encode() + b"\n", mode=TOKEN_MODE)
    return token, True


def signature(token: str, epoch: int, body: bytes) -> str:
    """What grayroute_nginx.push checks: base64(HMAC-SHA1(token, "<epoch>\\n" .. body))."""
    mac = hmac.new(token.encode("ascii"), str(epoch).encode() + b"\n" + body, hashlib.sha1)
    return base64.b64encode(mac.digest()).decode("ascii")


def push_headers(token: str, epoch: int, body: bytes) -> dict[str, str]:
    return {"Connection": "close", "Content-Type": "text/plain", "X-Grayagent-Epoch": str(epoch),
            "X-Grayagent-Signature": signature(token, epoch, body)}


def data_version(body: bytes) -> int:
    """The version a rendered data chunk carries (nginx_dynamic_render.render_data's last line)."""
    found = re.search(rb"^return \{version = (\d+),", body, re.MULTILINE)
    if found is None:
        raise ValueError("not grayagent routing data")
    return int(found.group(1))


class ControlClient:
    def __init__(self, listen: str, version_path: str, push_path: str, token_path: Path) -> None:
        self.listen = listen
        self.version_path = version_path
        self.push_path = push_path
        self.token_path = token_path

    def _url(self, path: str) -> str:
        return f"http://{self.listen}{path}"

    def live_state(self) -> LiveState | None:
        try:
            status, body = http_get(self._url(self.version_path))
        except OSError:
            return None
        fields = dict(line.split(" ", 1) for line in body.splitlines() if " " in line)
        if status != 200 or "skeleton" not in fields:
            return None
        parts = fields.get("data", "").split()
        data = (int(parts[0]), parts[1]) if len(parts) == 2 and is_decimal(parts[0]) else None
        held = fields.get("held", "").split()
        return LiveState(fields["skeleton"], data,
                         (int(held[0]), int(held[1])) if len(held) == 2 and all(map(is_decimal, held)) else (0, 0))

    def push(self, body: bytes) -> None:
        """Push one rendered data chunk; going below the version nginx holds takes the next epoch."""
        token = read_token(self.token_path)
        if token is None:
            raise StepFailed(f"no push token in {self.token_path}")
        state = self.live_state()
        epoch, held_version = state.held if state is not None else (0, 0)
        if data_version(body) < held_version:
            epoch += 1  # going back on purpose: a local revert, a pin, or restoring last-good
        request = urllib.request.Request(self._url(self.push_path), data=body, method="POST",  # noqa: S310
                                         headers=push_headers(token, epoch, body))
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
                response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace").strip()
            raise StepFailed(f"nginx refused the routing data ({exc.code}): {detail[:300]}") from None
