"""Issue 12 item 4: catastrophic-backtracking regexes are refused statically, and the simulator is linear."""

from __future__ import annotations

import time

import pytest

from grayagent.errors import InvalidDocument
from grayagent.rules.model import Field, Service, StringMatch, Upstream, ValueCondition, parse_document
from grayagent.rules.modeldata import Listen, Rule
from grayagent.rules.regexsubset import check_portable_regex
from grayagent.rules.routing import Request, route
from tests.docs import document, dump, service

EXPONENTIAL = [
    r"(a+)+$", r"(a|aa)*$", r"(x*)*y", r"(.*a){12}",                # the four
    r"(\w+\s?)+$", r"(a|b|ab)*c", r"(\w|\d)+!", r"((ab)+)+", r"(a{1,3})+", r"(?i)(A|a)+", r"(a?a)+",
    r"^(([a-z])+.)+[A-Z]([a-z])+$", r"(x+x+)+y", r"(?mi)(A|a)+",
    # Python's parser factors (a|a) into a(?:|) and merges one-character branches into a deduplicated class;
    # PCRE keeps both branches (measured: each hits PCRE's match limit on 26 a's and a near miss).
    r"(a|a)*$", r"(a|b|c|a)*d", r"(?:[ab]|a)*c", r"(a|[a])*b", r"([ab]|[bc])*d", r"(a|\x61)*x",
    r"(ab|a[b])+c", r"(x(a|a)y)*z", r"((a|a)b)*$",
]
OVERLAPPING = [  # polynomial: a run splits between adjacent repeats; \d*\d*x on 8,000 digits cost PCRE 28 s
    r"\d*\d*x", r"a*a*a*b", r"^[a-z]+[a-z0-9]*$", r".*.*=x", r"\w*\d*!", r"(\d+)\d*x", r".*a.*$",
    r"(\s*,\s*)*x", r"(a+b?a*)c",
]
SAFE_LOOK_ALIKES = [
    r"a+b+", r"(ab)+", r"[a-z]+\.x", r"(\d+\.){3}\d+", r"(\.(com|co))+", r"(a|ab)*", r"^/api/v[0-9]+/",
    r"([a-z0-9-]+\.)*example\.com$", r"(/[^/]+)+", r"(,\s*\w+)*", r"^(GET|POST)$", r"(foo|far)+", r"[\w\d]+",
    r"(?i)^(iphone|ipad)", r"^v2(\.[0-9]+)?$", r"(a|b)+",
    r".*foo.*", r"(ab|a)*", r"(A|a)*x", r"(a|ab)(c|bcd)(d*)", r"^[a-z][a-z0-9]*$", r"\d+\.\d*", r"(a|a\b)*x",
    r"^(bj|sh)[0-9]*$", r"(?:a1|a2|b1)+",
]


def _doc(pattern: str) -> bytes:
    rules = [{"name": "r", "match": {"headers": {"X-A": {"regex": pattern}}}, "to": "canary"}]
    return dump(document(service(rules=rules)))


@pytest.mark.parametrize("pattern", EXPONENTIAL)
def test_ambiguous_repetition_is_refused_naming_the_field(pattern: str) -> None:
    with pytest.raises(InvalidDocument) as info:
        parse_document(_doc(pattern), "doc.yaml")
    [problem] = info.value.problems
    assert str(problem).startswith("doc.yaml: spec.services[0].rules[0].match.headers.X-A.regex: ambiguous repetition")


@pytest.mark.parametrize("pattern", OVERLAPPING)
def test_overlapping_adjacent_repetition_is_refused(pattern: str) -> None:
    assert (check_portable_regex(pattern) or "").startswith("overlapping repetition"), pattern


@pytest.mark.parametrize("pattern", SAFE_LOOK_ALIKES)
def test_safe_look_alikes_are_accepted(pattern: str) -> None:
    assert check_portable_regex(pattern) is None
    parse_document(_doc(pattern), "doc.yaml")


def test_nested_counts_re2_cannot_compile_are_refused() -> None:
    """Envoy refuses (?:a{100}){100}; Python re and PCRE accept it, so validation must ask RE2."""
    assert (check_portable_regex("(?:a{100}){100}") or "").startswith("RE2 (Envoy) cannot compile it")


def test_the_simulator_matches_in_linear_time_even_past_validation() -> None:
    """A version written by another tool skips validation: `grayagent route` must still answer at once.

    With Python's backtracking re, (a+)+$ on 25 a's and a '!' takes seconds (doubling per character).
    """
    svc = Service("api", Listen("", 8080), (), (Upstream("stable", ("127.0.0.1:1",)),
                                                Upstream("canary", ("127.0.0.1:2",))), "stable",
                  (Rule("r", (ValueCondition(Field("header", "x-a"), StringMatch("regex", ("(a+)+$",))),), "canary"),),
                  None)
    started = time.process_time()
    decision = route(svc, Request.build(headers={"X-A": "a" * 26 + "!"}))
    assert decision.upstream == "stable"
    assert route(svc, Request.build(headers={"X-A": "a" * 4000})).upstream == "canary"
    assert time.process_time() - started < 0.5
