"""Named ID lists (spec.lists): the checks on their IDs, and embedding `file:` lists into the document.

A list is kept beside the rules and versioned with them. In a stored (published) document every list holds
its IDs as `values`, so that each version is self-contained and immutable and no agent ever reads an
operator's file. `file:` is a convenience of the operator's copy: `embed_list_files` reads those files when
validate, publish or route --file load a document from disk, and rewrites the document with `values`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from grayagent.errors import InvalidDocument, Problem
from grayagent.rules.docload import dump_like, format_path, load_data
from grayagent.rules.modeldata import IdList

MAX_LIST_IDS = 1_000_000   # IDs in all lists of one document
MAX_ID_BYTES = 256
# C0, DEL and C1: no request field carries them, and list files and the Lua serialisation use "\n" as separator.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def id_problem(value: str) -> str | None:
    """Why `value` cannot be an ID; None when it can."""
    bad = _CONTROL.search(value)
    if bad:
        return f"contains the control character {bad.group()!r}"
    if value != value.strip():
        return "has leading or trailing whitespace, which proxies strip from header values"
    size = len(value.encode("utf-8", "surrogateescape"))
    if not 1 <= size <= MAX_ID_BYTES:
        return f"is {size} bytes; an ID has 1 to {MAX_ID_BYTES}"
    return None


def _first_duplicate(values: list[str]) -> tuple[int, int] | None:
    seen: dict[str, int] = {}
    for i, value in enumerate(values):
        if value in seen:
            return seen[value], i
        seen[value] = i
    return None


def check_lists(raw: dict[str, Any], source: str) -> tuple[tuple[IdList, ...], list[Problem]]:
    """The lists of schema-valid `spec.lists`, and every problem (each naming the list and the value index)."""
    problems: list[Problem] = []
    lists: list[IdList] = []
    total = 0
    for name, entry in raw.items():
        path: list[str | int] = ["spec", "lists", name]
        if "file" in entry:
            problems.append(Problem(source, format_path([*path, "file"]),
                                    "a stored document holds its IDs as values; file: is read by validate, publish "
                                    "and route --file from the operator's disk, relative to the document"))
            lists.append(IdList(name, ()))  # known, so its matchers report nothing more
            continue
        values: list[str] = entry["values"]
        total += len(values)
        # One pass in C over the whole list first; the per-ID walk runs only to name the culprits.
        joined = "".join(values)
        suspect = _CONTROL.search(joined) is not None or any(v != v.strip() or len(v) > MAX_ID_BYTES // 4
                                                               for v in values)
        bad = 0
        for i, value in enumerate(values if suspect else ()):
            why = id_problem(value)
            if why is not None:
                bad += 1
                if bad <= 10:
                    problems.append(Problem(source, format_path([*path, "values", i]), f"{_short(value)} {why}"))
        if not bad and (twins := _case_twins_problem(values)) is not None:
            problems.append(Problem(source, format_path([*path, "values", twins[0]]), twins[1]))
        if len(set(values)) != len(values):
            first, again = _first_duplicate(values) or (0, 0)
            problems.append(Problem(source, format_path([*path, "values", again]),
                                    f"{_short(values[again])} is listed twice (first at index {first})"))
        lists.append(IdList(name, tuple(values)))
    if total > MAX_LIST_IDS:
        problems.append(Problem(source, "spec.lists", f"{total} IDs in all; the limit is {MAX_LIST_IDS}"))
    return tuple(lists), problems


# nginx refuses a config token over 4 KB ("too long parameter"); the reload renderer writes the IDs equal up
# to ASCII case as one map value (nginx_render.list_maps), each as \t and the ID, with \\, \" and $ escaped.
NGINX_TOKEN_LIMIT = 4000


def _case_twins_problem(values: list[str]) -> tuple[int, str] | None:
    """The index of the first ID whose case twins (IDs equal up to ASCII case) no longer fit one nginx
    map value, and why; None when they fit. Unicode lowering folds at least what ASCII folding does, so
    a list without Unicode twins (the usual case, one pass in C) has none."""
    if len(set(map(str.lower, values))) == len(values):
        return None
    used: dict[str | bytes, int] = {}
    for i, value in enumerate(values):
        fold = value.lower() if value.isascii() else value.encode("utf-8").lower()
        size = used.get(fold, 0) + 2 + len(value.encode("utf-8")) + value.count("\\") + value.count('"') \
            + 11 * value.count("$")
        if size > NGINX_TOKEN_LIMIT:
            return i, (f"{_short(value)} and the IDs equal to it up to ASCII case take {size} bytes in nginx's map, "
                       f"over {NGINX_TOKEN_LIMIT}: nginx compares map keys case-insensitively and keeps them "
                       "together; drop some of these case variants")
        used[fold] = size
    return None


def _short(value: str, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- files


def parse_list_file(content: bytes, shown: str) -> tuple[list[str], list[str]]:
    """IDs of a list file (one per line; blank lines and lines starting with # are skipped), and problems
    as "FILE line N: why"."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [], [f"{shown}: not UTF-8 (byte {exc.start})"]
    ids: list[str] = []
    problems: list[str] = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        why = id_problem(line)
        if why is not None:
            if len(problems) < 10:
                problems.append(f"{shown} line {number}: {_short(line)} {why}")
            continue
        ids.append(line)
    return ids, problems


def _file_entries(data: Any) -> Iterable[tuple[str, dict[str, Any]]]:
    spec = data.get("spec") if isinstance(data, dict) else None
    lists = spec.get("lists") if isinstance(spec, dict) else None
    if not isinstance(lists, dict):
        return ()
    return [(name, entry) for name, entry in lists.items()
            if isinstance(entry, dict) and isinstance(entry.get("file"), str)]


def embed_list_files(content: bytes, source: str, read: Callable[[str], bytes]) -> bytes:
    """The document with every `file:` list replaced by `values` read through `read(path)` (which raises
    OSError); `content` itself when no list names a file. YAML comes back as YAML (comments are not kept),
    JSON as JSON. Raises InvalidDocument naming the document, the list's field, and the file and line."""
    if b"file" not in content:
        return content
    data = load_data(content, source)
    entries = list(_file_entries(data))
    if not entries:
        return content
    problems: list[Problem] = []
    for name, entry in entries:
        field = f"spec.lists.{name}.file"
        if len(entry) != 1:
            continue  # values and file together: the schema reports it
        try:
            raw = read(entry["file"])
        except OSError as exc:
            problems.append(Problem(source, field, f"{entry['file']}: {exc.strerror or exc}"))
            continue
        ids, why = parse_list_file(raw, entry["file"])
        problems.extend(Problem(source, field, w) for w in why)
        entry.clear()
        entry["values"] = ids
    if problems:
        raise InvalidDocument(problems)
    return dump_like(data, content)


def read_document(path: str) -> bytes:
    """A rule document from the operator's disk, with its `file:` ID lists read (relative to the document's
    directory) and embedded as `values`: what is validated, routed, planned and published is self-contained."""
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidDocument([Problem(path, "", exc.strerror or str(exc))]) from None
    return embed_list_files(content, path, lambda name: (Path(path).parent / name).read_bytes())
