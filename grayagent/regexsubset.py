"""The regex subset that means the same in Python `re` (bytes), nginx PCRE and Envoy RE2.

Regexes run on bytes, unanchored (a search), like nginx's `~`. We accept a pattern only if it is printable
ASCII and uses no construct that one of the three engines lacks or reads differently.
"""

from __future__ import annotations

import functools
import importlib
import re
from typing import Any

# Python 3.11+ keeps the regex parser private (it is the deprecated sre_parse); it is the only way to see
# a pattern's structure with exactly the parser `re` uses.
_c: Any = importlib.import_module("re._constants")
_p: Any = importlib.import_module("re._parser")

_REFUSED_OPS: dict[Any, str] = {
    _c.ASSERT: "lookaround is not supported by RE2",
    _c.ASSERT_NOT: "negative lookaround is not supported by RE2",
    _c.GROUPREF: "backreferences are not supported by RE2",
    _c.GROUPREF_EXISTS: "conditional groups are not supported by RE2",
}
for _name, _why in (("ATOMIC_GROUP", "atomic groups are not supported by RE2"),
                    ("POSSESSIVE_REPEAT", "possessive quantifiers are not supported by RE2")):
    if hasattr(_c, _name):
        _REFUSED_OPS[getattr(_c, _name)] = _why

_REFUSED_AT = {
    _c.AT_END_STRING: r"\Z means different things in PCRE and RE2; use $",
}
_ALLOWED_FLAGS = re.IGNORECASE | re.MULTILINE | re.DOTALL
MAX_REPEAT = 1000  # RE2's limit on {n,m}
_LITERAL_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_/:@-")


def regex_literal(value: str) -> str:
    """A regex fragment matching exactly the UTF-8 bytes of `value`, in printable ASCII.

    Every other byte becomes `\\xHH`, which means that byte in Python `re` on bytes, in nginx's non-UTF
    PCRE and in Envoy's RE2 (which runs on bytes, Latin-1, as measured in docs/notes/envoy-probe.md).
    """
    return "".join(chr(b) if b in _LITERAL_SAFE else f"\\x{b:02x}" for b in value.encode("utf-8", "surrogateescape"))


def _walk(items: Any) -> str | None:
    for op, arg in items:
        if op in _REFUSED_OPS:
            return _REFUSED_OPS[op]
        if op == _c.AT and arg in _REFUSED_AT:
            return _REFUSED_AT[arg]
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            low, high, sub = arg
            if low > MAX_REPEAT or (high != _c.MAXREPEAT and high > MAX_REPEAT):
                return f"repetition counts above {MAX_REPEAT} are not supported by RE2"
            error = _walk(sub)
        elif op == _c.SUBPATTERN:
            _group, add_flags, del_flags, sub = arg
            if (add_flags | del_flags) & ~_ALLOWED_FLAGS:
                return "only the inline flags i, m and s are portable"
            error = _walk(sub)
        elif op == _c.BRANCH:
            error = next((e for e in (_walk(b) for b in arg[1]) if e), None)
        elif op in (_c.IN, _c.NOT_LITERAL, _c.LITERAL, _c.ANY, _c.AT, _c.CATEGORY, _c.RANGE, _c.NEGATE):
            error = None
        else:
            error = None
        if error:
            return error
    return None


@functools.lru_cache(maxsize=8192)
def check_portable_regex(pattern: str) -> str | None:
    """None if the pattern is portable, else a one-line reason."""
    if not pattern.isascii() or any(not (0x20 <= ord(ch) < 0x7F) for ch in pattern):
        return "only printable ASCII is allowed in a regex; escape other bytes as \\xHH"
    lexical = _lexical_problem(pattern)
    if lexical:
        return lexical
    try:
        parsed = _p.parse(pattern.encode("ascii"), 0)
    except re.error as exc:
        return f"invalid regex: {exc}"
    flags = parsed.state.flags & ~re.DEBUG
    if flags & ~_ALLOWED_FLAGS:
        return "only the inline flags i, m and s are portable"
    return _walk(parsed)


# Spellings the three engines parse differently, found by running them side by side: Python reads
# [[:digit:]] as a set and a literal ']', PCRE2 < 10.43 and RE2 read x{,3} as literal text, and \v is
# vertical whitespace in PCRE but only \x0b in Python and RE2.
_LEXICAL = {
    "\\z": "\\z is not supported by Python re; use $",
    "\\v": "\\v means different things in PCRE and RE2; use \\x0b",
    "[:": "POSIX classes like [[:digit:]] are read differently by Python re; use \\d or [0-9]",
    "[.": "POSIX collating elements ([. .]) are not portable",
    "[=": "POSIX equivalence classes ([= =]) are not portable",
    "{,": "{,n} is literal text in PCRE and RE2 but a repeat in Python; write {0,n}",
    "(?#": "(?#...) comments are not supported by RE2",
}


def _lexical_problem(pattern: str) -> str | None:
    """Scan outside escapes (\\x is one token) for the spellings in _LEXICAL."""
    i = 0
    while i < len(pattern):
        if pattern[i] == "\\":
            token = pattern[i:i + 2]
            if token in _LEXICAL:
                return _LEXICAL[token]
            i += 2
            continue
        for spelling, why in _LEXICAL.items():
            if not spelling.startswith("\\") and pattern.startswith(spelling, i):
                return why
        i += 1
    return None


def compile_portable(pattern: str) -> re.Pattern[bytes]:
    return re.compile(pattern.encode("ascii"))
