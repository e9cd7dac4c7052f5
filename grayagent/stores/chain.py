"""Checking a store's history as a hash chain (`grayagent history --verify`), for every backend.

Each version's `parent_digest` names its parent's entry digest (stores/envelope.py). A version is broken when:
- it cannot be read back as itself: unreadable, another version's envelope, or content not matching `digest`;
- its `parent_digest` does not match its parent as stored now (the parent, or this link, was edited);
- it has no `parent_digest` while its parent has one: every version published after the chain began
  carries one, so such a version was rewritten;
- its parent is missing while it names one.
A version without `parent_digest` whose parent has none either was published before chaining existed (or
written by another tool as a bare document): it starts a chain. The newest version has no child to vouch
for it; the agents' audit logs record the digest each of them applied.
"""

from __future__ import annotations

from dataclasses import dataclass

from grayagent.errors import GrayagentError, StoreError, VersionNotFound
from grayagent.stores.base import Store, VersionRecord
from grayagent.stores.envelope import entry_digest


@dataclass(frozen=True)
class ChainBreak:
    version: int          # the version whose check failed
    suspects: frozenset[int]  # the versions that may have been edited (it, and the parent it names)
    reason: str

    def __str__(self) -> str:
        return f"version {self.version}: {self.reason}"


def verify_chain(store: Store) -> list[ChainBreak]:
    """Every break in the store's history, oldest version first; empty when the chain is intact."""
    breaks: list[ChainBreak] = []
    records: dict[int, VersionRecord] = {}
    for meta in store.history():
        try:
            records[meta.version] = store.get(meta.version)
        except GrayagentError as exc:
            breaks.append(ChainBreak(meta.version, frozenset({meta.version}), str(exc)))
    for number, record in sorted(records.items()):
        meta = record.meta
        if meta.parent <= 0:
            if meta.parent_digest:
                breaks.append(ChainBreak(number, frozenset({number}), "names a parent digest but no parent"))
            continue
        parent = records.get(meta.parent)
        if parent is None:
            try:
                parent = store.get(meta.parent)
            except VersionNotFound:
                if meta.parent_digest:
                    breaks.append(ChainBreak(number, frozenset({number, meta.parent}),
                                             f"its parent, version {meta.parent}, is missing"))
                continue
            except StoreError:
                continue  # reported as the parent's own break above
        if meta.parent_digest:
            if entry_digest(parent.meta) != meta.parent_digest:
                breaks.append(ChainBreak(number, frozenset({number, meta.parent}),
                                         f"parent_digest does not match version {meta.parent}: "
                                         f"version {meta.parent} (or this link) was edited"))
        elif parent.meta.parent_digest:
            breaks.append(ChainBreak(number, frozenset({number}),
                                     f"has no parent_digest but its parent, version {meta.parent}, is chained: "
                                     f"version {number} was rewritten"))
    current = store.current_number()
    if current and current not in records and not any(b.version == current for b in breaks):
        # The pointer names a version the history lacks (deleted, or the pointer edited): the agents
        # cannot apply it, and nothing above noticed, because no later version names it as a parent.
        breaks.append(ChainBreak(current, frozenset({current}),
                                 f"`current` points at version {current}, which is missing"))
    return sorted(breaks, key=lambda b: b.version)


def require_intact(store: Store, version: int) -> VersionRecord:
    """`version`, refused (StoreError) when the chain says it may have been edited: before republishing it."""
    record = store.get(version)
    for found in verify_chain(store):
        if version in found.suspects:
            raise StoreError(f"{store.url}: version {version} fails the history check ({found}); "
                             "run `grayagent history --verify`")
    return record
