"""Pure checks of parsing and validation: every bad document gets one line naming the field."""

from __future__ import annotations

import json

import pytest

from grayagent.errors import InvalidDocument
from grayagent.rules.model import parse_document
from grayagent.rules.regexsubset import check_portable_regex
from tests.conftest import EXAMPLES
from tests.docs import document, dump, service


def problems(doc: dict | bytes) -> list[str]:
    content = doc if isinstance(doc, bytes) else dump(doc)
    with pytest.raises(InvalidDocument) as info:
        parse_document(content, "doc.yaml")
    return [str(p) for p in info.value.problems]


def test_example_is_valid() -> None:
    release = parse_document((EXAMPLES / "shop.yaml").read_bytes(), "shop.yaml")
    svc = release.service("product")
    assert [r.name for r in svc.rules] == ["testers", "vip", "regions", "ios-beta", "office", "v2-api"]
    assert svc.split is not None and svc.split.weights == (("stable", 9000), ("canary", 1000))


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(apiVersion="v2"), "doc.yaml: apiVersion: must be 'grayagent/v1'"),
    (lambda d: d["metadata"].update(name="Bad Name"), "doc.yaml: metadata.name: 'Bad Name' does not match"),
    (lambda d: d["spec"]["services"][0].update(listen=70000), "doc.yaml: spec.services[0].listen: 70000 is greater"),
    (lambda d: d["spec"]["services"][0].update(default="nope"), "doc.yaml: spec.services[0].default: unknown upstream 'nope'"),
    (lambda d: d["spec"]["services"][0].update(bogus=1), "doc.yaml: spec.services[0]: unknown field: bogus"),
    (lambda d: d["spec"]["services"][0].update(split={"weights": {"stable": 90, "canary": 9.5}}),
     "doc.yaml: spec.services[0].split.weights: weights sum to 99.5, not 100"),
    (lambda d: d["spec"]["services"][0].update(split={"weights": {"stable": 90.001, "canary": 9.999}}),
     "doc.yaml: spec.services[0].split.weights.stable: 90.001 has more than two decimals"),
    (lambda d: d["spec"]["services"][0].update(split={"weights": {"stable": 50, "ghost": 50}}),
     "doc.yaml: spec.services[0].split.weights.ghost: unknown upstream 'ghost'"),
    (lambda d: d["spec"]["services"][0].update(rules=[{"name": "r", "match": {"headers": {"X-A": {"regex": "(?<=a)b"}}}, "to": "canary"}]),
     "doc.yaml: spec.services[0].rules[0].match.headers.X-A.regex: lookaround is not supported"),
    (lambda d: d["spec"]["services"][0].update(rules=[{"name": "r", "match": {"headers": {"X-A": {"regex": "(a)\\1"}}}, "to": "canary"}]),
     "doc.yaml: spec.services[0].rules[0].match.headers.X-A.regex: backreferences are not supported by RE2"),
    (lambda d: d["spec"]["services"][0].update(rules=[{"name": "r", "match": {"sourceCIDRs": ["10.0.0.1/8"]}, "to": "canary"}]),
     "doc.yaml: spec.services[0].rules[0].match.sourceCIDRs[0]: 10.0.0.1/8 has host bits set"),
    (lambda d: d["spec"]["services"][0].update(rules=[{"name": "r", "match": {}, "to": "canary"}]),
     "doc.yaml: spec.services[0].rules[0].match: give one of headers"),
    (lambda d: d["spec"]["services"][0]["upstreams"]["stable"].update(servers=["10.0.0.1:80; evil"]),
     "doc.yaml: spec.services[0].upstreams.stable.servers[0]: '10.0.0.1:80; evil' does not match"),
    (lambda d: d["spec"]["services"][0].update(hosts=["a.com;b"]),
     "doc.yaml: spec.services[0].hosts[0]: 'a.com;b' does not match"),
    (lambda d: d["spec"]["services"].append(service()), "doc.yaml: spec.services[1].name: duplicate service name 'product'"),
    (lambda d: d["spec"]["services"].append(service(name="other")),
     "doc.yaml: spec.services[1].listen: port 8080 with no hosts (catch-all) is already used by service 'product'"),
])
def test_bad_documents_name_file_and_field(mutate, expected) -> None:
    doc = document()
    mutate(doc)
    found = problems(doc)
    assert any(p.startswith(expected) for p in found), found
    assert all("\n" not in p for p in found)


def test_yaml_errors_are_one_line_with_position() -> None:
    assert problems(b"apiVersion: [unclosed\n")[0].startswith("doc.yaml: invalid YAML at line 2")
    assert "duplicate key 'kind'" in problems(b"kind: a\nkind: b\n")[0]
    assert "aliases are not allowed" in problems(b"a: &x [1]\nb: *x\n")[0]
    assert problems(b"\xff\xfe")[0] == "doc.yaml: not UTF-8 (byte 0)"
    assert "duplicate key" in problems(b'{"a": 1, "a": 2}')[0]


def test_hostile_values_are_refused_or_confined() -> None:
    """Names, hosts and servers reject syntax characters; matcher values may hold any text a request can carry."""
    hostile = 'a"; } server { listen 1; } #$host\t{'
    doc = document(service(rules=[{"name": "r", "match": {"headers": {"X-A": {"exact": hostile}}}, "to": "canary"}]))
    parse_document(dump(doc), "doc.yaml")  # allowed: the renderer escapes it (see test_render)
    doc["spec"]["services"][0]["rules"][0]["match"]["headers"]["X-A"] = {"exact": "x" * 1_000_000}
    assert problems(doc) == ["doc.yaml: spec.services[0].rules[0].match.headers.X-A.exact: longer than 4096 characters"]
    doc = document(service(split={"salt": "$host", "weights": {"stable": 100}}))
    assert problems(doc)[0].startswith("doc.yaml: spec.services[0].split.salt: '$host' does not match")
    doc = document(service(rules=[{"name": "r", "match": {"headers": {"X-A;b": {"exact": "1"}}}, "to": "canary"}]))
    assert problems(doc)[0].startswith("doc.yaml: spec.services[0].rules[0].match.headers")


@pytest.mark.parametrize("pattern, ok", [
    ("^(bj|sh)$", True), ("iPhone|iPad", True), ("(?i)android", True), (r"\d{3}-\d{4}", True),
    ("(?=a)", False), ("(?!a)", False), (r"(a)\1", False), ("(?P<x>a)(?P=x)", False), ("a{1001}", False),
    ("(?x) a", False), ("é", False), ("a\nb", False), (r"a\Z", False), (r"a\z", False), ("(", False),
    ("(?>a)", False), ("a++", False),
    # found by running the engines side by side: each of these is read differently by one of them
    ("[[:digit:]]", False), ("x{,3}y", False), (r"a\vb", False), ("(?#note)a", False), ("(?a)x", False),
    (r"\[:x", True), (r"\\v", True), ("x{0,3}y", True),
])
def test_portable_regex_subset(pattern: str, ok: bool) -> None:
    assert (check_portable_regex(pattern) is None) == ok


def test_a_trailing_newline_or_a_lone_surrogate_never_passes_a_pattern() -> None:
    """Python's $ matches before a final newline; validation anchors patterns at the true end instead."""
    for mutate in (lambda s: s.update(hosts=["product.example.com\n"]),
                   lambda s: s["upstreams"]["stable"].update(servers=["10.0.0.1:8080\n"]),
                   lambda s: s.update(split={"salt": "abc\n", "weights": {"stable": 100}}),
                   lambda s: s.update(name="product\n")):
        svc = service()
        mutate(svc)
        assert problems(document(svc)), svc
    svc = service(rules=[{"name": "r", "match": {"headers": {"X-A": {"exact": "a\ud800"}}}, "to": "canary"}])
    assert problems(json.dumps(document(svc)).encode()) == [
        "doc.yaml: spec.services[0].rules[0].match.headers.X-A.exact: not valid Unicode (an unpaired surrogate)"]


@pytest.mark.parametrize("match, field, expected", [
    ({"headers": {"X-A": {"exact": "a\n}\nserver {"}}}, "headers.X-A.exact", "the control character '\\n'"),
    ({"headers": {"X-A": {"prefix": "a\r"}}}, "headers.X-A.prefix", "the control character '\\r'"),
    ({"headers": {"X-A": {"in": ["ok", "nul\u0000"]}}}, "headers.X-A.in[1]", "the control character '\\x00'"),
    ({"headers": {"X-A": {"exact": "del\u007f"}}}, "headers.X-A.exact", "the control character '\\x7f'"),
    ({"cookies": {"c": {"exact": "a\nb"}}}, "cookies.c.exact", "the control character"),
    ({"query": {"q": {"in": ["\u001b[31m"]}}}, "query.q.in[0]", "the control character"),
    ({"path": {"prefix": "/a\n"}}, "path.prefix", "the control character"),
    ({"headers": {"X-A": {"exact": " padded"}}}, "headers.X-A.exact", "starts with a space or tab"),
    ({"headers": {"X-A": {"exact": "padded\t"}}}, "headers.X-A.exact", "ends with a space or tab"),
    ({"cookies": {"c": {"exact": "a;b"}}}, "cookies.c.exact", "contains ';'"),
    ({"query": {"q": {"exact": "a&b"}}}, "query.q.exact", "contains '&'"),
    ({"path": {"exact": "/a?b=1"}}, "path.exact", "contains '?'"),
    ({"headers": {"X-Envoy-Upstream-Alt": {"present": True}}}, "headers.X-Envoy-Upstream-Alt", "Envoy removes"),
    ({"headers": {"x-grayagent-split": {"exact": "1"}}}, "headers.x-grayagent-split", "grayagent's own"),
    ({"sourceCIDRs": ["fe80::%eth0/64"]}, "sourceCIDRs[0]", "zone index"),
])
def test_matcher_values_no_request_can_carry_are_refused(match, field, expected) -> None:
    doc = document(service(rules=[{"name": "r", "match": match, "to": "canary"}]))
    [problem] = problems(doc)
    assert problem.startswith(f"doc.yaml: spec.services[0].rules[0].match.{field}: "), problem
    assert expected in problem and "\n" not in problem


def test_values_a_request_can_carry_are_accepted() -> None:
    match = {"headers": {"X-A": {"exact": "tab\tinside; & ? é"}, "X-B": {"prefix": "trailing "}},
             "cookies": {"c": {"exact": "a b&c?"}}, "query": {"q": {"exact": "a;b%26"}}, "path": {"exact": "/a b;c"}}
    parse_document(dump(document(service(rules=[{"name": "r", "match": match, "to": "canary"}]))), "doc.yaml")


def test_split_key_on_a_reserved_header_and_mapped_listen_are_refused() -> None:
    doc = document(service(split={"key": {"header": "X-Envoy-Original-Path"}, "weights": {"stable": 100}}))
    assert problems(doc)[0].startswith("doc.yaml: spec.services[0].split.key.header: cannot split on it: Envoy")
    doc = document(service(listen="[::ffff:127.0.0.1]:8080"))
    assert problems(doc) == ["doc.yaml: spec.services[0].listen: '[::ffff:127.0.0.1]:8080' is an IPv4-mapped IPv6 "
                             "address, which nginx cannot bind; write 127.0.0.1:8080"]


def test_reserved_listen_problems_name_the_service_on_the_agents_own_ports() -> None:
    from grayagent.rules.model import reserved_listen_problems

    release = parse_document(dump(document(service(listen=9180), service(name="b", listen="127.0.0.2:18089"),
                                           service(name="c", listen="127.0.0.1:8081"))), "doc.yaml")
    reserved = {"--status-listen": "127.0.0.1:9180", "--verify-listen": "127.0.0.1:18089"}
    assert [str(p) for p in reserved_listen_problems(release, "doc.yaml", reserved)] == [
        "doc.yaml: spec.services[0].listen: 9180 is the agent's own --status-listen address 127.0.0.1:9180"]
    assert len(reserved_listen_problems(release, "doc.yaml", {"--verify-listen": "0.0.0.0:18089"})) == 1
