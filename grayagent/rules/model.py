"""The rule document: parse, schema check, semantic checks, and the frozen routing model.

`parse_document(content, source)` is the only way in. It either returns a `Release` whose every value is
safe to render into any target, or raises `InvalidDocument` listing every problem as
"SOURCE: path.to.field: what is wrong".

The stages live in their own modules: `docload` (bytes to data), `docschema` (the JSON Schema),
`semantics` (checks the schema cannot express) and `modeldata` (the frozen model). This module is the
facade the rest of the code imports from.
"""

from __future__ import annotations

import re

from grayagent.errors import InvalidDocument, Problem
from grayagent.rules.docload import MAX_DEPTH, MAX_DOCUMENT_BYTES, format_path, load, load_data
from grayagent.rules.docschema import schema, schema_problems
from grayagent.rules.modeldata import (
    API_VERSION,
    Analysis,
    CidrCondition,
    Condition,
    Field,
    FieldKind,
    IPNetwork,
    Listen,
    MatchKind,
    PrometheusQueries,
    Release,
    Rollout,
    RolloutStep,
    Rule,
    Service,
    Split,
    StringMatch,
    Upstream,
    ValueCondition,
    iter_value_fields,
)
from grayagent.rules.semantics import (
    ReleaseChecker,
    link_local_url,
    parse_duration,
    parse_listen,
    parse_weight,
    reserved_listen_problems,
)

__all__ = [
    "API_VERSION", "MAX_DEPTH", "MAX_DOCUMENT_BYTES", "Analysis", "CidrCondition", "Condition", "Field",
    "FieldKind", "IPNetwork", "Listen", "MatchKind", "PrometheusQueries", "Release", "Rollout", "RolloutStep",
    "Rule", "Service", "Split", "StringMatch", "Upstream", "ValueCondition", "document_name", "format_path",
    "iter_value_fields", "link_local_url", "load_data", "parse_document", "parse_duration", "parse_listen",
    "parse_weight", "reserved_listen_problems", "schema",
]


def parse_document(content: bytes, source: str) -> Release:
    """Parse and fully validate a rule document; raise InvalidDocument with every problem found."""
    loaded = load(content, source)
    problems = schema_problems(loaded.data, source, loaded.spellings)
    if problems:
        raise InvalidDocument(problems)
    checker = ReleaseChecker(source)
    release = checker.release(loaded.data)
    if checker.problems:
        raise InvalidDocument(checker.problems)
    return release


def document_name(content: bytes, source: str) -> str:
    """The release name of a valid document (stores key their entries by it)."""
    data = load_data(content, source)
    name = data.get("metadata", {}).get("name") if isinstance(data, dict) else None
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", name):
        raise InvalidDocument([Problem(source, "metadata.name", "missing or not a valid name")])
    return name
