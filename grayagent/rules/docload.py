"""Bytes in, JSON-shaped data out: YAML (1.1, as PyYAML reads it) or JSON.

Every hostile shape is an `InvalidDocument`, never another exception: nesting is bounded before anything
recurses, YAML types that JSON lacks (dates, binary, sets) never reach the checks, aliases and duplicate keys
are refused. Unquoted YAML scalars that became booleans, numbers or null are remembered with their spelling,
so that a later "is not of type string" can say "quote it".
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from grayagent.errors import InvalidDocument, Problem

# 1,000,000 IDs in spec.lists take 10-20 MB; the agent's parse of that stays in seconds.
MAX_DOCUMENT_BYTES = 32 * 1024 * 1024
# A rule document nests about ten levels deep; the limit leaves room and keeps every later walk shallow.
MAX_DEPTH = 64

Path = tuple[str | int, ...]

_TAG = "tag:yaml.org,2002:"
_JSON_TAGS = {f"{_TAG}{t}" for t in ("str", "int", "float", "bool", "null")}
# YAML 1.1 reads these unquoted as other types; JSON has no such types, so they stay the text as written.
_TEXT_WHEN_IMPLICIT = {f"{_TAG}{t}" for t in ("timestamp", "merge", "value")}
_TAG_REFUSED = ("the YAML tag {tag} is not allowed: a rule document holds only strings, numbers, booleans, "
                "null, lists and mappings")
_Loader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper: type[Any] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml: 100k-ID lists in well under 1 s


@dataclass
class Loaded:
    data: Any
    # Unquoted YAML scalars read as a boolean, number or null: path -> the text as written.
    spellings: dict[Path, str] = field(default_factory=dict)


def format_path(parts: Any) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def load(content: bytes, source: str) -> Loaded:
    """Decode YAML or JSON, or raise InvalidDocument with one problem."""
    if len(content) > MAX_DOCUMENT_BYTES:
        raise InvalidDocument([Problem(source, "", f"document is {len(content)} bytes; the limit is "
                                                   f"{MAX_DOCUMENT_BYTES}")])
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidDocument([Problem(source, "", f"not UTF-8 (byte {exc.start})")]) from None
    if text.lstrip().startswith("{"):
        return Loaded(_load_json(text, source))
    return _YamlBuilder(text, source).build()


def dump_like(data: Any, content: bytes) -> bytes:
    """`data` written back in the format `content` was in: JSON as JSON, YAML as YAML (comments are not kept)."""
    if content.lstrip().startswith(b"{"):
        return json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8")
    dumped: str = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=None,
                            width=120)
    return dumped.encode("utf-8")


def load_data(content: bytes, source: str) -> Any:
    return load(content, source).data


# ---------------------------------------------------------------------------------------------- JSON


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """The deepest bracket nesting outside strings, counted without recursion (json.loads recurses)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0)


def loads_json(raw: bytes | str) -> Any:
    """json.loads for text another tool or person may have written (a store entry, a state file, a request
    line): nesting deep enough to exhaust Python's stack is a ValueError like any other bad JSON, not a
    RecursionError that every caller's `except ValueError` misses."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _load_json(text: str, source: str) -> Any:
    depth = json_depth(text)
    if depth > MAX_DEPTH:
        raise InvalidDocument([Problem(source, "", f"nested {depth} levels deep; the limit is {MAX_DEPTH}")])
    try:
        return json.loads(text, object_pairs_hook=_json_pairs)
    except RecursionError:  # unreachable after the depth check; kept so that no input can crash the caller
        raise InvalidDocument([Problem(source, "", f"nested deeper than {MAX_DEPTH} levels")]) from None
    except ValueError as exc:
        raise InvalidDocument([Problem(source, "", f"invalid JSON: {exc}")]) from None


# ---------------------------------------------------------------------------------------------- YAML


class _Refused(Exception):
    def __init__(self, path: Path, message: str, mark: Any = None) -> None:
        super().__init__(message)
        self.path = path
        self.message = message
        self.mark = mark


def _where(mark: Any) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


class _Frame:
    """One open mapping or sequence while the event stream is read."""

    __slots__ = ("container", "key", "path")

    def __init__(self, container: dict[str, Any] | list[Any], path: Path) -> None:
        self.container = container
        self.path = path
        self.key: str | None = None  # a mapping's key whose value comes next


class _YamlBuilder:
    """Builds plain data from PyYAML's event stream with an explicit stack.

    PyYAML's composer and constructor recurse once per nesting level, so a deep document raises
    RecursionError inside them; reading events keeps the depth in our hands.
    """

    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.spellings: dict[Path, str] = {}

    def build(self) -> Loaded:
        loader = _Loader(self.text)
        try:
            return Loaded(self._events(loader), self.spellings)
        except _Refused as exc:
            shown = format_path(exc.path[:12]) + (".…" if len(exc.path) > 12 else "")
            raise InvalidDocument([Problem(self.source, shown, exc.message + _where(exc.mark))]) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            # A ReaderError (a control character) has no problem/mark and a str() over several lines.
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
            raise InvalidDocument([Problem(self.source, "", f"invalid YAML{where}: {problem}")]) from None
        finally:
            loader.dispose()

    def _events(self, loader: Any) -> Any:
        stack: list[_Frame] = []
        root: Any = None
        documents = 0
        while True:
            event = loader.get_event()
            if isinstance(event, yaml.StreamEndEvent):
                return root
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise _Refused((), "more than one YAML document; give one", event.start_mark)
                continue
            if isinstance(event, yaml.StreamStartEvent | yaml.DocumentEndEvent):
                continue
            if isinstance(event, yaml.AliasEvent):
                raise _Refused(self._path(stack), "aliases are not allowed", event.start_mark)
            if isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
                done = stack.pop()
                if not stack:
                    root = done.container
                continue
            path = self._path(stack)
            value: Any
            if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
                self._check_collection_tag(event, path)
                if len(stack) >= MAX_DEPTH:
                    raise _Refused(path, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
                value = {} if isinstance(event, yaml.MappingStartEvent) else []
            elif isinstance(event, yaml.ScalarEvent):
                value = self._scalar(loader, event, path)
            else:  # pragma: no cover - PyYAML emits no other events
                raise _Refused(path, f"unexpected YAML event {type(event).__name__}")
            if not stack:
                root = value
            else:
                self._add(stack[-1], value, event)
            if isinstance(event, yaml.CollectionStartEvent):
                stack.append(_Frame(value, path))

    @staticmethod
    def _path(stack: list[_Frame]) -> Path:
        if not stack:
            return ()
        top = stack[-1]
        if isinstance(top.container, list):
            return (*top.path, len(top.container))
        return top.path if top.key is None else (*top.path, top.key)

    def _add(self, frame: _Frame, value: Any, event: Any) -> None:
        if isinstance(frame.container, list):
            frame.container.append(value)
            return
        if frame.key is None:  # this value is a key
            if not isinstance(value, str):
                spelled = getattr(event, "value", None)
                what = f"the key {spelled}" if isinstance(spelled, str) else "a key"
                raise _Refused(frame.path, f"{what} is read by YAML as {_describe(value)}, not a string; "
                                           "quote it", event.start_mark)
            if value in frame.container:
                raise _Refused(frame.path, f"duplicate key {value!r}", event.start_mark)
            frame.key = value
            return
        frame.container[frame.key] = value
        frame.key = None

    def _scalar(self, loader: Any, event: Any, path: Path) -> Any:
        tag = event.tag
        if tag is None or tag == "!":
            tag = loader.resolve(yaml.ScalarNode, event.value, event.implicit)
            if tag in _TEXT_WHEN_IMPLICIT:
                return event.value
        if tag not in _JSON_TAGS:
            raise _Refused(path, _TAG_REFUSED.format(tag=_short_tag(tag)), event.start_mark)
        if tag == f"{_TAG}str":
            return event.value
        node = yaml.ScalarNode(tag, event.value)
        try:
            value = loader.construct_object(node)
        except (yaml.YAMLError, ValueError, KeyError, TypeError, ArithmeticError) as exc:  # e.g. !!bool maybe
            raise _Refused(path, f"{event.value!r} is not a valid {_short_tag(tag)}: {exc}", event.start_mark) \
                from None
        if event.tag is None and event.implicit[0]:  # a plain (unquoted) scalar
            self.spellings[path] = event.value
            if _misread_number(event.value, value):
                raise _Refused(path, f"YAML 1.1 reads the unquoted {event.value} as the number {value}; write the "
                                     "number in plain decimal, or quote it for the text", event.start_mark)
        return value

    @staticmethod
    def _check_collection_tag(event: Any, path: Path) -> None:
        allowed = (None, "!", f"{_TAG}map" if isinstance(event, yaml.MappingStartEvent) else f"{_TAG}seq")
        if event.tag not in allowed:
            raise _Refused(path, _TAG_REFUSED.format(tag=_short_tag(event.tag)), event.start_mark)


# Numbers as JSON writes them. YAML 1.1 also reads octal (010 is 8), hex, 1_000 and base 60 (1:30 is 90).
_DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


def _misread_number(spelling: str, value: Any) -> bool:
    """A finite number spelled other than in plain decimal (NaN and infinity are refused later, by name)."""
    return (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            and not _DECIMAL.fullmatch(spelling))


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_TAG):] if tag.startswith(_TAG) else tag


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return f"the number {value}"
    return "a collection"


def quote_hint(spelling: str, value: Any) -> str:
    """Why a YAML scalar is not the string it looks like, and the fix."""
    if not spelling:
        return "an empty YAML value is null; write \"\" for an empty string"
    return f"YAML reads the unquoted {spelling} as {_describe(value)}; write \"{spelling}\" in quotes for the text"
