"""The regex subset that means the same in Python `re` (bytes), nginx PCRE and Envoy RE2.

Regexes run on bytes, unanchored (a search), like nginx's `~`. We accept a pattern only if it is printable
ASCII and uses no construct that one of the three engines lacks or reads differently.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import re
from collections.abc import Iterator
from typing import Any

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information

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
    ignore_case = bool(flags & re.IGNORECASE) or re.search(r"\(\?[a-z]*i[a-z-]*[:)]", pattern) is not None
    backtracking = _Backtracking(ignore_case, "|" in pattern)
    error = _walk(parsed) or backtracking.problem(list(parsed)) or backtracking.duplicate_alternatives(pattern) \
        or backtracking.adjacent_overlap(list(parsed))
    if error is None:
        try:
            compile_portable(pattern)
        except re2.error as exc:  # e.g. nested counts whose product is over RE2's limit
            reason = exc.args[0].decode("ascii", "replace") if exc.args and isinstance(exc.args[0], bytes) else exc
            return f"RE2 (Envoy) cannot compile it: {reason}"
    return error


# ---------------------------------------------------------------------------------------------- backtracking


Chars = frozenset[int]
_ALL: Chars = frozenset(range(256))
_DIGIT: Chars = frozenset(b"0123456789")
_WORD: Chars = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_SPACE: Chars = frozenset(b" \t\n\r\f\v")
_CATEGORIES: dict[Any, Chars] = {
    _c.CATEGORY_DIGIT: _DIGIT, _c.CATEGORY_NOT_DIGIT: _ALL - _DIGIT,
    _c.CATEGORY_WORD: _WORD, _c.CATEGORY_NOT_WORD: _ALL - _WORD,
    _c.CATEGORY_SPACE: _SPACE, _c.CATEGORY_NOT_SPACE: _ALL - _SPACE,
}
_REPEATS = (_c.MAX_REPEAT, _c.MIN_REPEAT)
BACKTRACKING = ("ambiguous repetition: {what} inside a repeat lets one text split in exponentially many ways, "
                "so nginx's PCRE would backtrack for seconds on a near miss; make each repetition start or end "
                "with a character the inner part cannot match, e.g. ([a-z]+\\.)+ (see docs/rules.md)")


OVERLAP = ("overlapping repetition: two unbounded repeats in a row can take the same characters, so a run of "
           "them splits between the repeats in many ways and nginx's PCRE backtracks for seconds on a long "
           "near miss; merge them or separate them with a character only one can match, e.g. [a-z][a-z0-9]* "
           "(see docs/rules.md)")


def _alternations(pattern: str) -> Iterator[tuple[list[str], bool]]:
    """Each group's branch texts split on its top-level '|', and whether the group (or one around it) is
    under a repeat that may run twice or more. Escapes and classes are skipped, as the parser reads them."""
    groups: list[tuple[int, int, list[str], bool]] = []  # (start, end, branches, quantified)
    stack: list[tuple[int, int, list[int]]] = []  # (open paren, content start, bar positions)
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "[":
            i += 2 if pattern.startswith("[^", i) else 1
            i += 1 if pattern.startswith("]", i) else 0
            while i < len(pattern) and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
        elif ch == "(":
            start = i + 1
            if pattern.startswith("?", start):
                close = min((k for k in (pattern.find(":", start), pattern.find(">", start), pattern.find(")", start))
                             if k != -1), default=len(pattern))
                start = close + 1 if pattern[close] != ")" else close
            stack.append((i, start, []))
        elif ch == "|" and stack:
            stack[-1][2].append(i)
        elif ch == ")" and stack:
            opened, start, bars = stack.pop()
            cuts = [start - 1, *bars, i]
            branches = [pattern[a + 1:b] for a, b in itertools.pairwise(cuts)]
            groups.append((opened, i, branches, _repeats_again(pattern, i + 1)))
        i += 1
    for start, end, branches, _quantified in groups:
        if len(branches) > 1:
            yield branches, any(q and s <= start and end <= e for s, e, _b, q in groups)


def _inline_groups(items: list[Any]) -> list[Any]:
    """A sequence with its groups' contents spliced in: (a*)(b)c and a*bc are the same concatenation."""
    out: list[Any] = []
    for op, arg in items:
        if op == _c.SUBPATTERN:
            out += _inline_groups(list(arg[3]))
        else:
            out.append((op, arg))
    return out


def _repeats_again(pattern: str, at: int) -> bool:
    """Whether the quantifier at `at` (if any) lets the item before it run twice or more."""
    if pattern.startswith(("*", "+"), at):
        return True
    counts = re.match(r"\{(\d+)(,(\d*))?\}", pattern[at:])
    if counts is None:
        return False
    high = counts.group(3) if counts.group(2) else counts.group(1)
    return high == "" or int(high) >= 2


class _Backtracking:
    """A static test for catastrophic backtracking, after regexploit's idea.

    A repeat that may run twice or more, `X{m,n}` with n >= 2, is refused when X holds an ambiguous piece:
    a repeat with a variable count, or an alternation whose branches can begin alike. If X could then
    match a whole iteration with only the characters that piece matches, the engine can split one run of
    those characters between iterations in exponentially many ways: `(a+)+`, `(a|aa)*`, `(x*)*y`,
    `(.*a){12}`. A character the piece cannot match, `([a-z]+\\.)+`, pins each split, and is accepted.
    Over-cautious by design (no false negatives among these shapes; a few safe patterns are refused).
    """

    def __init__(self, ignore_case: bool, alternation: bool) -> None:
        self.ignore_case = ignore_case
        # Python's parser turns (a|b) into the class [ab]; PCRE keeps the alternation. A class whose
        # members overlap may therefore be an ambiguous alternation, when the pattern has a '|' at all.
        self.alternation = alternation

    def problem(self, items: list[Any]) -> str | None:
        for op, arg in items:
            if op in _REPEATS:
                _low, high, sub = arg
                if high >= 2:
                    what = self._ambiguous_iteration(list(sub))
                    if what:
                        return BACKTRACKING.format(what=what)
                error = self.problem(list(sub))
            elif op == _c.SUBPATTERN:
                error = self.problem(list(arg[3]))
            elif op == _c.BRANCH:
                error = next((e for e in (self.problem(list(b)) for b in arg[1]) if e), None)
            else:
                error = None
            if error:
                return error
        return None

    def duplicate_alternatives(self, pattern: str) -> str | None:
        """Alternatives under a repeat that can match one same text character by character: (a|a)*, (a|[a])*,
        ([ab]|[bc])*, (ab|a[b])*. Each iteration then has two paths, so n iterations have 2^n.

        Python's parser hides these (it factors common prefixes out and merges one-character branches into
        a deduplicated class), while PCRE keeps every branch; so the branches are read from the text.
        """
        for branches, repeated in _alternations(pattern):
            if not repeated:
                continue
            parsed = []
            for text in branches:
                try:
                    parsed.append([self.atom(item) for item in _p.parse(text.encode("ascii"), 0)])
                except re.error:
                    return None  # a branch that does not parse alone (a flag group); the whole was parsed above
            for i, a in enumerate(parsed):
                for b in parsed[i + 1:]:
                    if len(a) == len(b) and all(x and y and x & y for x, y in zip(a, b, strict=True)):
                        return BACKTRACKING.format(what="alternatives that can match the same text")
        return None

    def adjacent_overlap(self, items: list[Any]) -> str | None:
        """Two unbounded repeats in a row that can take the same character, with nothing between them that
        needs another: \\d*\\d*x, ^[a-z]+[a-z0-9]*$, .*a.*$. A run of that character splits between them in n
        ways (n^k for k such repeats), times n start positions: measured, \\d*\\d*x on a header of 8,000
        digits cost PCRE 28 s."""
        if self._overlap_in_row(items):
            return OVERLAP
        for op, arg in items:
            sub: list[list[Any]] = []
            if op in _REPEATS:
                sub = [list(arg[2])]
                # One iteration's end meets the next one's start: (\\s*,\\s*)* reads as \\s*,\\s*\\s*,\\s*.
                if arg[1] >= 2 and self._overlap_in_row(sub[0] * 2):
                    return OVERLAP
            elif op == _c.SUBPATTERN:
                sub = [list(arg[3])]
            elif op == _c.BRANCH:
                sub = [list(b) for b in arg[1]]
            for seq in sub:
                if error := self.adjacent_overlap(seq):
                    return error
        return None

    def _overlap_in_row(self, sequence: list[Any]) -> bool:
        items = _inline_groups(sequence)
        for i, item in enumerate(items):
            first = self._unbounded_chars(item)
            if not first:
                continue
            for j in range(i + 1, len(items)):
                second = self._unbounded_chars(items[j])
                if second and any(self.can_cover(items[i + 1:j], frozenset((c,))) for c in first & second):
                    return True
                if not self.can_cover(items[i + 1:j + 1], first):
                    break
        return False

    def _unbounded_chars(self, item: Any) -> Chars | None:
        op, arg = item
        if op in _REPEATS and arg[1] == _c.MAXREPEAT:
            return self.chars(list(arg[2]))
        if op == _c.SUBPATTERN and len(arg[3]) == 1:
            return self._unbounded_chars(next(iter(arg[3])))
        return None

    def _ambiguous_iteration(self, body: list[Any]) -> str | None:
        for piece, what in self._variable_pieces(body):
            chars = self.chars(piece)
            if chars and self.can_cover(body, chars):
                return what
        return None

    def _variable_pieces(self, items: list[Any]) -> Iterator[tuple[list[Any], str]]:
        for op, arg in items:
            if op in _REPEATS:
                low, high, sub = arg
                if low != high:
                    yield [(op, arg)], "a repeat of variable count"
                yield from self._variable_pieces(list(sub))
            elif op == _c.SUBPATTERN:
                yield from self._variable_pieces(list(arg[3]))
            elif op == _c.BRANCH:
                branches = [list(b) for b in arg[1]]
                if any(self._may_begin_alike(a, b) for i, a in enumerate(branches) for b in branches[i + 1:]):
                    yield [(op, arg)], "alternatives that can begin alike"
                for b in branches:
                    yield from self._variable_pieces(b)
            elif op == _c.IN and self.alternation and self._members_overlap(arg):
                yield [(op, arg)], "alternatives that can match the same character"

    def _members_overlap(self, members: list[Any]) -> bool:
        seen: Chars = frozenset()
        for member in members:
            if member[0] == _c.NEGATE:
                return False
            chars = self.atom((_c.IN, [member]))
            if chars is None or seen & chars:
                return chars is not None
            seen |= chars
        return False

    def _may_begin_alike(self, a: list[Any], b: list[Any]) -> bool:
        i = 0
        while i < len(a) and i < len(b):
            ca, cb = self.atom(a[i]), self.atom(b[i])
            if ca is None or cb is None:
                fa, na = self.first(a[i:])
                fb, nb = self.first(b[i:])
                return na or nb or bool(fa & fb)
            if not ca & cb:
                return False
            i += 1
        return True  # one branch is a prefix of the other's possible text

    def atom(self, item: Any) -> Chars | None:
        """The characters a one-character item matches; None for anything else."""
        op, arg = item
        if op == _c.LITERAL:
            chars: Chars = frozenset((arg,))
        elif op == _c.NOT_LITERAL:
            chars = _ALL - self.fold(frozenset((arg,)))
        elif op == _c.ANY:
            chars = _ALL
        elif op == _c.IN:
            chars = frozenset()
            negate = False
            for kind, value in arg:
                if kind == _c.NEGATE:
                    negate = True
                elif kind == _c.LITERAL:
                    chars |= {value}
                elif kind == _c.RANGE:
                    chars |= frozenset(range(value[0], value[1] + 1))
                elif kind == _c.CATEGORY:
                    chars |= _CATEGORIES.get(value, _ALL)
            chars = _ALL - self.fold(chars) if negate else chars
        else:
            return None
        return self.fold(chars)

    def fold(self, chars: Chars) -> Chars:
        if not self.ignore_case:
            return chars
        return chars | frozenset(c ^ 0x20 for c in chars if 0x41 <= (c & ~0x20) <= 0x5A)

    def chars(self, items: list[Any]) -> Chars:
        """Every character the items can consume."""
        out: Chars = frozenset()
        for op, arg in items:
            single = self.atom((op, arg))
            if single is not None:
                out |= single
            elif op in _REPEATS:
                out |= self.chars(list(arg[2]))
            elif op == _c.SUBPATTERN:
                out |= self.chars(list(arg[3]))
            elif op == _c.BRANCH:
                for b in arg[1]:
                    out |= self.chars(list(b))
        return out

    def can_cover(self, items: list[Any], chars: Chars) -> bool:
        """Whether the items can match some text made only of `chars` (the empty text included)."""
        for op, arg in items:
            single = self.atom((op, arg))
            if single is not None:
                ok = bool(single & chars)
            elif op in _REPEATS:
                ok = arg[0] == 0 or self.can_cover(list(arg[2]), chars)
            elif op == _c.SUBPATTERN:
                ok = self.can_cover(list(arg[3]), chars)
            elif op == _c.BRANCH:
                ok = any(self.can_cover(list(b), chars) for b in arg[1])
            else:
                ok = True  # zero-width: anchors and boundaries
            if not ok:
                return False
        return True

    def first(self, items: list[Any]) -> tuple[Chars, bool]:
        """The characters the items can begin with, and whether they can match the empty text."""
        out: Chars = frozenset()
        for op, arg in items:
            single = self.atom((op, arg))
            if single is not None:
                return out | single, False
            if op in _REPEATS or op == _c.SUBPATTERN:
                sub = list(arg[2] if op in _REPEATS else arg[3])
                chars, nullable = self.first(sub)
                out |= chars
                if not nullable and not (op in _REPEATS and arg[0] == 0):
                    return out, False
            elif op == _c.BRANCH:
                firsts = [self.first(list(b)) for b in arg[1]]
                for chars, _ in firsts:
                    out |= chars
                if not any(nullable for _, nullable in firsts):
                    return out, False
        return out, True


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


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.encoding = re2.Options.Encoding.LATIN1  # bytes, as Envoy runs it (docs/notes/envoy-probe.md)
_RE2_OPTIONS.log_errors = False  # a refused pattern is reported to the user, not logged to stderr by abseil


def compile_portable(pattern: str) -> Any:
    """RE2 on bytes: Envoy's own engine, and linear in the input, so no rule can make matching slow.

    The portable subset means the same in Python re, PCRE and RE2; RE2 is the one without backtracking.
    """
    return re2.compile(pattern.encode("ascii"), _RE2_OPTIONS)
