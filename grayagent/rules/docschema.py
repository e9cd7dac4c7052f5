"""The schema stage: the published JSON Schema, enforced with anchored patterns, and short readable messages."""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any

import fastjsonschema
import jsonschema

from grayagent.errors import Problem
from grayagent.rules.docload import Path, format_path, quote_hint


@functools.cache
def schema() -> dict[str, Any]:
    text = resources.files("grayagent").joinpath("schema/grayrelease.schema.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema())
    cls.check_schema(schema())
    validator: jsonschema.protocols.Validator = cls(_enforced_schema())
    return validator


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _schema_message(error: jsonschema.ValidationError) -> str:
    """jsonschema's messages quote the whole offending value (1 MB strings included); keep them short."""
    v = error.validator
    sch: dict[str, Any] = error.schema if isinstance(error.schema, dict) else {}
    instance: Any = error.instance
    expected: Any = error.validator_value
    if v == "maxLength":
        return f"longer than {expected} characters"
    if v == "minLength":
        return "must not be empty" if expected == 1 else f"shorter than {expected}"
    if v == "pattern":
        return f"{_short(instance)} does not match {expected}"
    if v == "additionalProperties":
        extra = sorted(set(instance) - set(sch.get("properties", {})))
        return f"unknown field{'s' if len(extra) > 1 else ''}: {', '.join(map(str, extra))}"
    if v == "required":
        missing = [k for k in expected if k not in instance]
        return f"missing required field{'s' if len(missing) > 1 else ''}: {', '.join(missing)}"
    if v == "type":
        text = f"{_short(instance)} is not of type {expected}"
        if isinstance(instance, str) and expected in ("number", "integer") and _LOOKS_NUMERIC.fullmatch(instance):
            # PyYAML (YAML 1.1) reads 1e3 and 1.0e3 as text: its exponents need a sign.
            text += "; YAML reads an exponent without a sign as text: write the number in plain decimal"
        return text
    if v == "maxProperties" and expected == 1:
        return f"give exactly one of {', '.join(sch.get('properties', {}))}; got {', '.join(instance)}"
    if v == "minProperties" and expected == 1 and "properties" in sch:
        return f"give one of {', '.join(sch['properties'])}"
    if v == "const":
        return f"must be {expected!r}"
    if v in ("maxItems", "maxProperties"):
        return f"more than {expected} entries"
    message: str = error.message
    return message if len(message) <= 200 else message[:197] + "..."


@functools.cache
def _enforced_schema() -> dict[str, Any]:
    """The published schema with every pattern anchored by \\Z instead of $.

    Both validators use Python's re, where $ also matches before a final newline: "host.example\\n" would
    pass ^...$ and reach a config. \\Z is Python-only, so the published file (for editors, ECMA regex) keeps $.
    """
    def anchor(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (v[:-1] + "\\Z" if k == "pattern" and isinstance(v, str) and v.endswith("$") else anchor(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [anchor(v) for v in node]
        return node

    enforced: dict[str, Any] = anchor(schema())
    return enforced


@functools.cache
def _fast_check() -> Callable[[Any], Any]:
    """fastjsonschema compiles the schema to Python: about 20x faster than jsonschema on large documents."""
    check: Callable[[Any], Any] = fastjsonschema.compile(_enforced_schema())
    return check


def _unencodable(data: Any, path: list[str | int]) -> Iterator[list[str | int]]:
    """Paths of strings that are not valid Unicode (lone surrogates from \\ud800 escapes)."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            yield path
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _unencodable(key, [*path, "<key>"])
            yield from _unencodable(value, [*path, str(key)])
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _unencodable(value, [*path, i])


def _non_finite(data: Any, path: list[str | int]) -> Iterator[list[str | int]]:
    """Paths of NaN and infinite numbers (YAML .nan/.inf, JSON NaN/Infinity): no schema bound refuses NaN."""
    if isinstance(data, float) and not math.isfinite(data):
        yield path
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _non_finite(value, [*path, str(key)])
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _non_finite(value, [*path, i])


_LOOKS_NUMERIC = re.compile(r"-?[0-9]+(?:\.[0-9]+)?[eE][0-9]+")


def _expects_text(sch: Any) -> bool:
    if not isinstance(sch, dict):
        return False
    kinds = sch.get("type")
    return ("pattern" in sch or kinds == "string" or (isinstance(kinds, list) and "string" in kinds)
            or any(isinstance(v, str) for v in sch.get("enum", ())) or isinstance(sch.get("const"), str))


def schema_problems(data: Any, source: str, spellings: dict[Path, str] | None = None) -> list[Problem]:
    """Every schema problem, each naming its field; empty when the data fits the schema."""
    try:  # one pass in C; the walks below run only to name the offending paths
        json.dumps(data, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        return [Problem(source, format_path(p), "not valid Unicode (an unpaired surrogate)")
                for p in _unencodable(data, [])]
    except ValueError:
        return [Problem(source, format_path(p), "is not a finite number (NaN and infinity are not allowed)")
                for p in _non_finite(data, [])]
    except TypeError:
        pass  # not JSON-shaped: the schema reports it
    try:
        _fast_check()(data)
        return []
    except fastjsonschema.JsonSchemaException:
        pass  # jsonschema explains it: every error, with paths and readable messages
    problems: list[Problem] = []
    for error in sorted(_validator().iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path]):
        path = list(error.absolute_path)
        if error.validator == "propertyNames":
            # jsonschema reports the bad name against its parent; name it in the path instead.
            path.append(error.instance if isinstance(error.instance, str) else "?")
        message = _schema_message(error)
        spelling = (spellings or {}).get(tuple(path))
        if spelling is not None and not isinstance(error.instance, str) and _expects_text(error.schema):
            message = f"{message}: {quote_hint(spelling, error.instance)}"
        problems.append(Problem(source, format_path(path), message))
    return problems
