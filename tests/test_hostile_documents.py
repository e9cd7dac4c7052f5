"""Hostile documents through the real CLI and a real agent: each is one refusal line naming file and field.

Issue 12 items 2, 3 and 6, issue 13 (YAML 1.1 surprises, header values RFC 9110 cannot carry).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from grayagent.stores.file import FileStore
from tests.agenthelp import grayagent, running_agent, wait_live
from tests.docs import document, dump, service
from tests.servers.proc import free_port, wait_until

DOC_HEAD = "apiVersion: grayagent/v1\nkind: GrayRelease\n"
SERVICE = ("spec:\n  services:\n    - name: api\n      listen: 18080\n"
           "      upstreams: {stable: {servers: ['127.0.0.1:9001']}}\n      default: stable\n")


def _refused(tmp_path: Path, name: str, content: bytes, field: str) -> str:
    """Run validate and publish on the file; both must exit 1 with one line naming file and field."""
    path = tmp_path / name
    path.write_bytes(content)
    store = tmp_path / "store"
    lines = []
    for argv in (("validate", str(path)), ("publish", str(path), "--store", str(store))):
        done = grayagent(*argv)
        assert done.returncode == 1, (argv, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
        errors = done.stderr.strip().splitlines()
        assert any(line.startswith(f"{path}: {field}") for line in errors), errors
        lines.extend(errors)
    assert not (store / "current").exists(), "nothing published"
    return "\n".join(lines)


@pytest.mark.parametrize("server", ["UNIX:19481", "unix:80", "Unix:8080", "127.1:80", "2130706433:80",
                                    "0x7f000001:80", "010.0.0.1:80"])
def test_servers_that_read_as_sockets_or_odd_ipv4_are_refused(tmp_path: Path, server: str) -> None:
    doc = document(service(servers={"stable": ["127.0.0.1:9001", server]}))
    out = _refused(tmp_path, "doc.json", dump(doc), "spec.services[0].upstreams.stable.servers[1]")
    assert server.split(":")[0] in out


@pytest.mark.parametrize(("listen", "server", "field"), [
    (18080, "127.0.0.1:\uff19\uff10\uff10\uff12", "spec.services[0].upstreams.stable.servers[1]"),
    ("127.0.0.1:\uff18\uff10\uff18\uff10", "127.0.0.1:9002", "spec.services[0].listen"),
    ("\u0968\u0966\u0966\u0966", "127.0.0.1:9002", "spec.services[0].listen"),
])
def test_ports_in_digits_other_than_ascii_are_refused(tmp_path: Path, listen: int | str, server: str,
                                                      field: str) -> None:
    """Python's \\d and int() read fullwidth or Devanagari digits as a port; nginx does not, and the raw
    text reached its config, so every agent failed its apply on a document that validated."""
    doc = document(service(listen=listen, servers={"stable": ["127.0.0.1:9001", server]}))
    _refused(tmp_path, "doc.json", dump(doc), field)


def test_deep_json_and_yaml_are_refused_not_a_recursion_error(tmp_path: Path) -> None:
    deep = b"[" * 5000 + b"]" * 5000
    out = _refused(tmp_path, "deep.json", b'{"metadata": ' + deep + b"}", "")
    assert "nested 5001 levels deep; the limit is 64" in out
    block = "".join("  " * i + "k:\n" for i in range(3000)).encode()
    assert "nested deeper than 64 levels" in _refused(tmp_path, "deep.yaml", block, "k.k.k")
    assert "nesting depth" in _refused(tmp_path, "flow.yaml", b"a: " + deep, "")


@pytest.mark.parametrize("value, expected", [
    ("2001-12-14", None),  # a date stays the text as written, so the description is valid
    ("!!binary aGVsbG8=", "the YAML tag !!binary is not allowed"),
    ("!!timestamp 2001-12-14", "the YAML tag !!timestamp is not allowed"),
    ("!!set {a}", "the YAML tag !!set is not allowed"),
])
def test_yaml_types_json_lacks_never_reach_the_checks(tmp_path: Path, value: str, expected: str | None) -> None:
    content = (DOC_HEAD + f"metadata: {{name: api, description: {value}}}\n" + SERVICE).encode()
    if expected is None:
        path = tmp_path / "ok.yaml"
        path.write_bytes(content)
        done = grayagent("validate", str(path))
        assert done.returncode == 0, done.stderr
        return
    assert expected in _refused(tmp_path, "doc.yaml", content, "metadata.description")


def test_a_yaml_date_where_a_header_value_is_wanted_is_that_text(tmp_path: Path) -> None:
    content = (DOC_HEAD + "metadata: {name: api}\n" + SERVICE +
               "      rules: [{name: r, match: {headers: {X-Day: {exact: 2024-01-01}}}, to: stable}]\n").encode()
    path = tmp_path / "date.yaml"
    path.write_bytes(content)
    done = grayagent("route", "--file", str(path), "--service", "api", "--header", "X-Day=2024-01-01")
    assert done.returncode == 0 and done.stdout.strip() == "upstream=stable rule=r by=rule", done.stderr


@pytest.mark.parametrize("spelling", ["on", "off", "yes", "no", "Yes", "NO"])
def test_yaml_11_booleans_where_a_string_is_wanted_say_quote_it(tmp_path: Path, spelling: str) -> None:
    content = (DOC_HEAD + "metadata: {name: api}\n" + SERVICE +
               f"      rules: [{{name: r, match: {{headers: {{X-Flag: {{exact: {spelling}}}}}}}, to: stable}}]\n"
               ).encode()
    out = _refused(tmp_path, "flag.yaml", content, "spec.services[0].rules[0].match.headers.X-Flag.exact")
    assert f'YAML reads the unquoted {spelling} as the boolean' in out and f'"{spelling}" in quotes' in out
    key = (DOC_HEAD + "metadata: {name: api}\n" + SERVICE +
           f"      rules: [{{name: r, match: {{headers: {{{spelling}: {{exact: x}}}}}}, to: stable}}]\n").encode()
    assert "quote it" in _refused(tmp_path, "key.yaml", key, "spec.services[0].rules[0].match.headers")


@pytest.mark.parametrize("weight", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_weights_say_so(tmp_path: Path, weight: str) -> None:
    text = json.dumps(document(service(split={"weights": {"stable": 50, "canary": 50}})))
    text = text.replace('"canary": 50}', f'"canary": {weight}}}')
    out = _refused(tmp_path, "nan.json", text.encode(), "spec.services[0].split.weights.canary")
    assert "not a finite number" in out and "decimals" not in out
    yaml_doc = (DOC_HEAD + "metadata: {name: api}\n" + SERVICE +
                "      split: {weights: {stable: .nan}}\n").encode()
    assert "not a finite number" in _refused(tmp_path, "nan.yaml", yaml_doc, "spec.services[0].split.weights.stable")


@pytest.mark.parametrize(("spelling", "read_as"), [("010", "8"), ("0x5a", "90"), ("9_0", "90"), ("1:30", "90"),
                                                  ("+90", "90"), (".9e+2", "90.0")])
def test_yaml_11_numbers_not_in_plain_decimal_are_refused(tmp_path: Path, spelling: str, read_as: str) -> None:
    """YAML 1.1 reads 010 as 8 and 1:30 as 90: a weight must never silently mean another number."""
    yaml_doc = (DOC_HEAD + "metadata: {name: api}\n" + SERVICE +
                f"      split: {{weights: {{stable: {spelling}}}}}\n").encode()
    out = _refused(tmp_path, "octal.yaml", yaml_doc, "spec.services[0].split.weights.stable")
    assert f"reads the unquoted {spelling} as the number {read_as}; write the number in plain decimal" in out


def test_an_exponent_yaml_keeps_as_text_says_how_to_write_the_number(tmp_path: Path) -> None:
    yaml_doc = (DOC_HEAD + "metadata: {name: api}\n" + SERVICE + "      split: {weights: {stable: 1e2}}\n").encode()
    out = _refused(tmp_path, "exp.yaml", yaml_doc, "spec.services[0].split.weights.stable")
    assert "'1e2' is not of type number; YAML reads an exponent without a sign as text" in out


# ---------------------------------------------------------------------------------------------- the agent


POISON = {
    "deep": b'{"apiVersion": "grayagent/v1", "metadata": ' + b"[" * 3000 + b"]" * 3000 + b"}",
    "date": (DOC_HEAD + "metadata: {name: api, description: !!timestamp 2001-12-14}\n" + SERVICE).encode(),
}


def _doc(backends, port: int) -> bytes:
    servers = {name: [f"127.0.0.1:{b.port}"] for name, b in backends.items()}
    return dump(document(service(listen=f"127.0.0.1:{port}", servers=servers)))


def _entries(state: Path) -> list[dict]:
    log = state / "audit.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("kind", sorted(POISON))
def test_agent_refuses_a_poison_version_written_by_another_tool_once(tmp_path: Path, nginx, backends,
                                                                     kind: str) -> None:
    port = free_port()
    store = FileStore(str(tmp_path / "store"))
    store.publish(_doc(backends, port), 0, "test", "good")
    state = tmp_path / "state"
    with running_agent(store, nginx, state, min_apply_interval=0.05) as agent:
        wait_live(nginx, 1)
        store.publish(POISON[kind], 1, "other-tool", "poison")  # bypasses validation, as another tool would
        wait_until(lambda: any(e["event"] == "refuse" for e in _entries(state)), 15, "the refuse audit entry")
        wait_until(lambda: "version 2 refused" in json.loads((state / "status.json").read_text())
                   .get("last_error", ""), 15, "status.json to name the refusal")
        store.publish(_doc(backends, port), 2, "test", "good again")
        wait_live(nginx, 3)
        wait_until(lambda: agent.status.applied_version == 3, 10, "the agent to record version 3")
    refusals = [e for e in _entries(state) if e["event"] == "refuse"]
    assert len(refusals) == 1 and refusals[0]["version"] == 2, refusals
    assert "nested" in refusals[0]["error"] or "!!timestamp" in refusals[0]["error"]


def test_agent_once_on_a_poison_current_version_refuses_and_exits_1(tmp_path: Path, nginx) -> None:
    store_dir = tmp_path / "store"
    FileStore(str(store_dir)).publish(POISON["deep"], 0, "other-tool", "poison")
    state = tmp_path / "state"
    done = subprocess.run([sys.executable, "-m", "grayagent.cli", "agent", "--once", "--store", str(store_dir),
                           "--nginx-conf", str(nginx.conf), "--nginx-main-conf", str(nginx.main_conf),
                           "--nginx-bin", nginx.binary, "--verify-listen", nginx.verify_listen,
                           "--state-dir", str(state)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "sync failed" not in done.stderr, done.stderr
    assert [e["event"] for e in _entries(state)] == ["refuse"]
    status = json.loads((state / "status.json").read_text())
    assert "version 1 refused" in status["last_error"] and status["healthy"] is False


def test_random_yaml_and_json_only_ever_raise_invalid_document() -> None:
    """A seeded fuzz over YAML tokens: tags, anchors, directives, odd scalars. Every outcome is a refusal."""
    import random

    from grayagent.errors import InvalidDocument
    from grayagent.rules.model import parse_document

    pieces = ["a", ":", " ", "\n", "- ", "[", "]", "{", "}", ",", "!!binary ", "!!set ", "&x ", "*x", "? ", "'", '"',
              "2001-12-14", ".nan", "on", "~", "<<: ", "=", "!foo ", "0x1F", "1:30", "%YAML 1.1\n", "---\n", "...\n",
              "|\n  ", ">\n", "\t", "#", "\x00", "\ufeff", "é", "!!python/object:os.system ", "!!map ", "!!seq ",
              "!!int x", "!!float y", "!!bool maybe", "!!null z", "!<tag:yaml.org,2002:str> ", "1e999", "0o7"]
    rng = random.Random(12)
    for _ in range(3000):
        doc = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        for content in (doc.encode(), ("{" + doc).encode()):
            with contextlib.suppress(InvalidDocument):
                parse_document(content, "f")


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b"])
def test_a_control_character_in_yaml_is_one_line(tmp_path: Path, char: str) -> None:
    """PyYAML's ReaderError has no mark, and its text spans two lines."""
    path = tmp_path / "doc.yaml"
    path.write_text(DOC_HEAD + f'metadata: {{name: "a{char}"}}\n' + SERVICE)
    done = grayagent("validate", str(path))
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"{path}: invalid YAML: unacceptable character")
