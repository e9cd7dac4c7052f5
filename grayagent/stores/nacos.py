"""The Nacos store: versions and the current pointer as config dataIds, fleet status as naming instances.

URL:  nacos://[user@]host:8848[,host2:8848...]/<release>[?options]
  namespace=ID          Nacos namespace id (default: the public namespace)
  group=NAME            config group that holds the release's dataIds (default GRAYAGENT)
  user=NAME             Nacos user; the password comes from password_file=PATH or $GRAYAGENT_NACOS_PASSWORD
  timeout=SECONDS       per-request timeout (default 5)
Passwords in the URL itself are refused: URLs end up in shell history, logs and audit entries. `url` is the
redacted form (no password_file, no timeout). Release, group and namespace use Nacos's dataId characters
(letters, digits, `_ - . :`). The server must speak the v1 client OpenAPI, as nacos-sdk-python 2.0.x
needs: Nacos 2.x, or 3.x with `nacos.core.api.compatibility.client.enabled=true`. `history` uses the v1
admin listing where it is on, else Nacos 3's /v3/admin/cs/config/list.

Layout in <group> of <namespace> (stable; other tools may read and write it):
  <release>.v<N>      immutable, written once: the version envelope (stores/envelope.py) with "publish_id", or
                      a bare rule document written by another tool (metadata derived; it starts a chain)
  <release>.current   the current version number as decimal text; "0" or missing means nothing published
  naming service <release>.agents, same group: one ephemeral instance per agent (ip = host name, port 1),
                      its status JSON in metadata["grayagent.status"]; heartbeats every 5 s, so it
                      turns unhealthy (and leaves `fleet()`) 15 s after the agent dies
Nacos's own config history is not used: it keeps 30 days and offers no rollback. Every version is its own
dataId, kept until someone deletes it, and a revert publishes an old version's content as a new version.

Publishing, with compare-and-set on the pointer (casMd5, which must travel as an HTTP header):
  1. read the pointer; if it does not say `expected`, Conflict at once (no entry is written);
  2. create <release>.v<N>, N = expected+1 with a create-only write (below). Entries are never overwritten:
     if N is taken by a racer on the same parent, wait for it to move the pointer and lose (Conflict) without
     writing an entry; if by an abandoned attempt (older, or the pointer never moved), try N+1;
  3. wait until the entry reads back: reads come from a cache that trails writes by ~90 ms (up to ~1 s), and
     an agent that sees the pointer move must find the version it names (without this wait, 6 of 200
     entries were still unreadable when the pointer that named them already read back);
  4. CAS the pointer from the exact text read in step 1 to "N": of concurrent publishers on one parent,
     exactly one wins; the others get Conflict (CLI exit 3);
  5. wait until the pointer reads back N, so the next command sees this publish (read-your-write).
An entry whose publisher lost anyway (it crashed, or timed out) stays as the record of an attempt that never
became current; `history` leaves such entries out: an entry whose parent's successor in the current lineage
is another entry.

Create-only write: a CAS whose casMd5 is the md5 of a random nonce, which no stored content has. On an existing
dataId it fails. On a missing one Nacos inserts instead of comparing, and its unique key (data_id, group_id,
tenant_id) lets exactly one of concurrent inserts succeed (measured: 8 racers, one winner, in every trial).

Client: nacos-sdk-python's v1 NacosClient reads configs (get_config, get_configs, with no_snapshot and no
failover directory, so a stale local copy is never served) and registers and beats naming instances.
It cannot send casMd5, logs in with the password in the URL query, treats a lost CAS (HTTP 500 "false")
as "all servers down", and its config watcher sleeps 1 s between polls, swallows errors (so no reconnect is
ever visible) and forks a multiprocessing manager. So grayagent logs in itself (password in the POST body),
hands the token to the SDK, and does CAS writes and the listener long-poll over a thin HTTP client.
The SDK's loggers are kept at WARNING, bridged into structlog with tokens and passwords redacted.

Modules: nacos_client.py (URL, login, HTTP, the SDK client, redaction), nacos_watch.py (the long-poll),
nacos_fleet.py (naming instances); this one keeps versions, history and publishing.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from grayagent.errors import Conflict, StoreError, VersionNotFound
from grayagent.rules.docload import loads_json
from grayagent.stores import envelope
from grayagent.stores.base import VersionMeta, VersionRecord, WatchHandler, digest_of, utc_now
from grayagent.stores.nacos_client import (
    AmbiguousWrite,
    NacosConfig,
    NacosConnection,
    list_page,
    md5_hex,
    parse_url,
    redact,
)
from grayagent.stores.nacos_fleet import NacosFleetStatus
from grayagent.stores.nacos_watch import NacosWatch
from grayagent.text import is_decimal

log = structlog.get_logger("grayagent.nacos")

RACER_WAIT = 5.0              # how long a publisher waits for a racer's pointer move (its read-back takes <= 3 s)
READ_LAG_DEADLINE = 3.0        # reads trail writes by ~90 ms, measured up to 1.1 s


class NacosStore:
    """Versions, the pointer and publishing; the watch (nacos_watch) and fleet status (nacos_fleet) are parts
    of their own, over one NacosConnection (nacos_client)."""

    def __init__(self, url: str) -> None:
        self.config = parse_url(url)
        self.url = self.config.redacted_url
        self.release = self.config.release
        self.group = self.config.group
        self.pointer_id = f"{self.release}.current"
        self.agents_service = f"{self.release}.agents"
        self._version_re = re.compile(re.escape(self.release) + r"\.v([1-9][0-9]{0,17})")
        self._conn = NacosConnection(self.config, self.url)
        self._watch = NacosWatch(self._conn, self.pointer_id)
        self._fleet = NacosFleetStatus(self._conn, self.agents_service)

    def _read(self, data_id: str) -> str | None:
        """A config's content, or None when it does not exist."""
        return self._conn.read(data_id)

    def _version_id(self, version: int) -> str:
        return f"{self.release}.v{version}"

    # ------------------------------------------------------------------ reading

    def _parse_pointer(self, text: str | None) -> int:
        if text is None:
            return 0
        value = text.strip()
        if not is_decimal(value):
            raise StoreError(f"{self.url}: {self.pointer_id} holds {value[:20]!r}, not a version number")
        return int(value)

    def _current_number(self) -> int:
        return self._parse_pointer(self._read(self.pointer_id))

    def _decode(self, version: int, raw: str) -> VersionRecord:
        try:
            data = loads_json(raw)
        except ValueError:
            data = None
        if envelope.is_envelope(data):
            return envelope.decode(data, f"{self.url}: {self._version_id(version)}", version)
        # A bare document written by another tool (console, OpenAPI): derive what the envelope would have said.
        content = raw.encode("utf-8")
        return VersionRecord(VersionMeta(version, 0, "", "written directly to Nacos", "", digest_of(content)),
                             content)

    def current_number(self) -> int:
        return self._current_number()

    def current(self) -> VersionRecord | None:
        number = self._current_number()
        if not number:
            return None
        deadline = time.monotonic() + READ_LAG_DEADLINE
        while True:
            try:
                return self.get(number)
            except VersionNotFound:
                # Publishers make the entry readable before the pointer names it; only another tool (or a
                # lagging cluster member) shows a pointer ahead of its entry, and then only briefly.
                if time.monotonic() > deadline:
                    raise StoreError(f"{self.url}: {self.pointer_id} names version {number}, which does not "
                                     "exist") from None
                time.sleep(0.05)

    def get(self, version: int) -> VersionRecord:
        raw = self._read(self._version_id(version)) if version > 0 else None
        if raw is None:
            raise VersionNotFound(f"version {version} does not exist in {self.url}")
        return self._decode(version, raw)

    def _get_settled(self, version: int) -> VersionRecord:
        """get(), waiting out the read lag: a parent that the pointer already names exists."""
        raw = self._wait_read(self._version_id(version), lambda t: t is not None, READ_LAG_DEADLINE)
        if raw is None:
            raise VersionNotFound(f"version {version} does not exist in {self.url}")
        return self._decode(version, raw)

    def _entries(self) -> dict[int, str]:
        """Every version entry's raw content, from the group listing (read from the database, no lag)."""
        found: dict[int, str] = {}
        page = 1
        while True:
            listing: Any = self._conn.call("list versions", functools.partial(
                list_page, group=self.group, page=page))
            if listing is None:
                return self._entries_v3()
            if not isinstance(listing, dict):
                raise StoreError(f"{self.url}: list versions: unexpected answer")
            for item in listing.get("pageItems") or []:
                match = self._version_re.fullmatch(str(item.get("dataId", "")))
                if match and item.get("content") is not None:
                    found[int(match.group(1))] = str(item["content"])
            if page >= int(listing.get("pagesAvailable") or 1):
                return found
            page += 1

    def _entries_v3(self) -> dict[int, str]:
        """The same from Nacos 3's admin API, for servers that keep the v1 admin API off (its default).

        That listing has no content, so each entry is read on its own (from the cache: an entry written in
        the last moments may be missing, as with any read).
        """
        found: dict[int, str] = {}
        page = 1
        while True:
            params = {"search": "blur", "dataId": f"{self.release}.v*", "groupName": self.group,
                      "pageNo": str(page), "pageSize": "500"}
            if self.config.namespace:
                params["namespaceId"] = self.config.namespace
            status, body = self._conn.http.call("GET", "/v3/admin/cs/config/list", params=params, what="list versions")
            try:
                data: Any = loads_json(body)["data"] if status == 200 else None
                items = list(data["pageItems"] or [])
                pages = int(data.get("pagesAvailable") or 1)
            except (ValueError, KeyError, TypeError):
                raise StoreError(f"{self.url}: list versions: HTTP {status} from the v1 and v3 list APIs") from None
            for item in items:
                match = self._version_re.fullmatch(str(item.get("dataId", "")))
                if match and (raw := self._read(match.group(0))) is not None:
                    found[int(match.group(1))] = raw
            if page >= pages:
                return found
            page += 1

    def history(self) -> list[VersionMeta]:
        """Every version, except entries of publishers that lost the compare-and-set (see the module doc)."""
        raws = self._entries()
        metas = {n: self._decode(n, raw).meta for n, raw in raws.items()}
        numbers = sorted(metas)

        def parent(n: int) -> int:
            if _publish_id(raws[n]) is not None:  # our envelope names its parent
                return metas[n].parent
            below = [m for m in numbers if m < n]  # a bare entry, or an envelope from another tool
            return below[-1] if below else 0

        current = self._current_number()
        lineage: dict[int, int] = {}  # parent -> its successor in the current lineage
        node = current if current in metas else 0
        while node:
            up = parent(node)
            if up >= node or up in lineage:
                break
            lineage[up] = node
            node = up if up in metas else 0
        in_lineage = set(lineage.values())
        kept = [n for n in numbers if n in in_lineage or parent(n) not in lineage]
        return [metas[n] for n in kept]

    # ------------------------------------------------------------------ writing

    def _write(self, data_id: str, content: str, cas_md5: str, kind: str, what: str) -> bool | None:
        """Publish with casMd5: True applied, False refused (md5 mismatch), None unknown (no answer)."""
        form = {"dataId": data_id, "group": self.group, "content": content, "type": kind}
        if self.config.namespace:
            form["tenant"] = self.config.namespace
        try:
            status, body = self._conn.http.call("POST", "/v1/cs/configs", form=form, headers={"casMd5": cas_md5},
                                           what=what, resend=False)
        except AmbiguousWrite:
            return None
        answer = body.strip()
        if status == 200 and answer == b"true":
            return True
        if status == 500 and answer == b"false":
            return False
        if 400 <= status < 500:
            raise StoreError(f"{self.url}: {what}: HTTP {status}: {redact(body.decode('utf-8', 'replace'))[:200]}")
        return None  # a server error: the write may have happened before it

    def _create_only(self, data_id: str, content: str, kind: str, what: str) -> bool | None:
        # No stored content has the md5 of a fresh random nonce, so this CAS cannot overwrite; on a missing
        # dataId Nacos inserts, and the unique key lets one of several concurrent inserts through.
        return self._write(data_id, content, md5_hex(uuid.uuid4().hex), kind, what)

    def _wait_read(self, data_id: str, done: Callable[[str | None], bool], deadline: float) -> str | None:
        """Re-read until `done(content)` or the deadline (read-your-write across the cache lag)."""
        end = time.monotonic() + deadline
        delay = 0.01
        while True:
            content = self._read(data_id)
            if done(content) or time.monotonic() >= end:
                return content
            time.sleep(delay)
            delay = min(delay * 1.5, 0.1)

    def _settled_number(self, expected: int) -> int:
        """The pointer after a lost CAS, for the Conflict message: a lagging read may still show `expected`."""
        text = self._wait_read(self.pointer_id, lambda t: self._parse_pointer(t) != expected, 1.0)
        return self._parse_pointer(text)

    def publish(self, content: bytes, expected: int, author: str, message: str) -> VersionMeta:
        envelope.require_utf8(content)
        pointer_text = self._read(self.pointer_id)
        actual = self._parse_pointer(pointer_text)
        if actual < expected:
            # A lagging read (the server's cache, or another cluster member) can trail a publish we know of.
            pointer_text = self._wait_read(self.pointer_id, lambda t: self._parse_pointer(t) >= expected, 1.0)
            actual = self._parse_pointer(pointer_text)
        if actual != expected:
            raise Conflict(expected, actual)  # checked first so that a stale publisher writes no entry
        nonce = uuid.uuid4().hex  # tells our entry from a racer's, when an answer was lost
        parent_digest = envelope.parent_link(self._get_settled, expected)
        number = expected + 1
        for _ in range(64):
            meta = VersionMeta(number, expected, utc_now(), author, message, digest_of(content), parent_digest)
            entry = envelope.encode(meta, content, publish_id=nonce).decode("utf-8")
            version_id = self._version_id(number)
            created = self._create_only(version_id, entry, "json", f"publish {version_id}")
            seen = self._wait_read(version_id, lambda t: t is not None, READ_LAG_DEADLINE)
            if created or (created is None and seen is not None and _publish_id(seen) == nonce):
                break
            # Taken, and entries are never overwritten. A racer on the same parent is about to move the
            # pointer: wait for it and lose without leaving an entry behind. An abandoned attempt: skip it.
            if seen is not None and _racing(seen, expected):
                now = self._parse_pointer(self._wait_read(self.pointer_id, lambda t: self._parse_pointer(t) != expected,
                                                          RACER_WAIT))
            else:
                now = self._current_number()
            if now != expected:
                raise Conflict(expected, now)
            number += 1
        else:
            raise StoreError(f"{self.url}: publish: no free version number after {number - expected - 1} tries")
        if pointer_text is None:
            # A CAS on a missing dataId creates it whatever casMd5 says, so it cannot tell "still nothing" from
            # "a racer just created it". Create the pointer as "0" first, create-only: that changes nothing a
            # reader sees (missing and "0" both mean no version), never overwrites a racer's pointer, and
            # makes the CAS below a real comparison against "0".
            self._create_only(self.pointer_id, "0", "text", "publish: create the pointer")
            pointer_text = "0"
        won = self._write(self.pointer_id, str(number), md5_hex(pointer_text), "text", "publish: move the pointer")
        if won is None:
            # No answer: only this publisher moves the pointer to `number` (it created that entry), so the
            # pointer showing `number` means it landed.
            seen_text = self._wait_read(self.pointer_id, lambda t: self._parse_pointer(t) == number,
                                        READ_LAG_DEADLINE)
            seen_number = self._parse_pointer(seen_text)
            if seen_number == number:
                won = True
            elif seen_number != expected:
                raise Conflict(expected, seen_number)
            else:
                raise StoreError(f"{self.url}: publish: the server did not confirm version {number}; "
                                 "check `grayagent history` before publishing again")
        if not won:
            raise Conflict(expected, self._settled_number(expected))
        seen_text = self._wait_read(self.pointer_id, lambda t: self._parse_pointer(t) == number, READ_LAG_DEADLINE)
        if self._parse_pointer(seen_text) != number:
            log.warning("published, but reads do not show it yet", store=self.url, version=number)
        return meta

    # ------------------------------------------------------------------ watching and fleet status

    def watch(self, handler: WatchHandler, stop: threading.Event) -> None:
        """Long-poll the pointer; after every start, reconnect or listener error, re-read it (full resync)."""
        self._watch.run(handler, stop)

    def report(self, host: str, status: dict[str, Any]) -> None:
        self._fleet.report(host, status)

    def fleet(self) -> list[dict[str, Any]]:
        return self._fleet.fleet()

    def close(self) -> None:
        self._fleet.close()
        self._conn.close()


def _racing(raw: str, parent: int) -> bool:
    """Whether an entry looks like a live publisher's on `parent`: ours, that parent, written moments ago."""
    try:
        data = loads_json(raw)
        created = datetime.strptime(str(data["created"]), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        return bool(int(data["parent"]) == parent and "publish_id" in data
                    and abs((datetime.now(UTC) - created).total_seconds()) < RACER_WAIT * 4)
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def _publish_id(raw: str) -> str | None:
    with contextlib.suppress(ValueError, AttributeError):
        value = loads_json(raw).get("publish_id")
        return str(value) if value is not None else None
    return None


__all__ = ["NacosConfig", "NacosStore", "parse_url", "redact"]
