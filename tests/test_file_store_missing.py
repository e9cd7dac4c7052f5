"""A mistyped directory store is an error naming the path (issue 13.3); only publish creates a store."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.agenthelp import grayagent
from tests.docs import document, dump, service


@pytest.fixture
def doc(tmp_path: Path) -> Path:
    path = tmp_path / "doc.yaml"
    path.write_bytes(dump(document(service())))
    return path


def one_line_naming(done, path: Path) -> None:  # type: ignore[no-untyped-def]
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], done.stderr


@pytest.mark.parametrize("command", [
    ["agent", "--once", "--nginx-conf", "/nonexistent/ga.conf"],
    ["history"], ["history", "--verify"], ["status"], ["show"], ["show", "1"], ["revert", "1"],
    ["rollout", "status"],
])
def test_every_command_but_publish_refuses_a_missing_store(tmp_path: Path, doc: Path, command: list[str]) -> None:
    real = tmp_path / "gray" / "store"
    assert grayagent("publish", str(doc), "--store", str(real), "--create").returncode == 0
    typo = tmp_path / "gray" / "stroe"
    extra = ["--state-dir", str(tmp_path / "state")] if command[0] == "agent" else []
    done = grayagent(*command, "--store", str(typo), *extra)
    one_line_naming(done, typo)
    assert not typo.exists(), "nothing is created at a mistyped path"


def test_publish_creates_a_store_only_in_an_existing_parent_or_with_create(tmp_path: Path, doc: Path) -> None:
    deep = tmp_path / "no" / "such" / "store"
    refused = grayagent("publish", str(doc), "--store", str(deep))
    one_line_naming(refused, deep)
    assert "--create" in refused.stderr and not (tmp_path / "no").exists()
    assert grayagent("publish", str(doc), "--store", str(deep), "--create").returncode == 0
    assert (deep / "current").read_text() == "1\n"
    beside = tmp_path / "store"  # its parent exists: an ordinary first publish
    assert grayagent("publish", str(doc), "--store", str(beside)).returncode == 0
    assert grayagent("history", "--store", str(beside)).returncode == 0
    assert "--create" in grayagent("publish", "--help").stdout


def test_a_store_path_that_is_a_file_is_refused(tmp_path: Path, doc: Path) -> None:
    not_dir = tmp_path / "store"
    not_dir.write_text("")
    one_line_naming(grayagent("history", "--store", str(not_dir)), not_dir)
    one_line_naming(grayagent("publish", str(doc), "--store", str(not_dir)), not_dir)


@pytest.mark.parametrize("pointer", [b"\xc2\xb2", b"\xff", "\uff11".encode(), b"1\x00", b"100000000000000000000000"])
def test_a_current_pointer_that_is_not_an_ascii_number_is_one_line(tmp_path: Path, doc: Path, pointer: bytes) -> None:
    """`current` written by another tool (a superscript two, a fullwidth one, not UTF-8) was a
    UnicodeDecodeError or int() ValueError traceback."""
    store = tmp_path / "store"
    assert grayagent("publish", str(doc), "--store", str(store), "--create").returncode == 0
    (store / "current").write_bytes(pointer)
    for command in (["status"], ["show"], ["history", "--verify"]):
        done = grayagent(*command, "--store", str(store))
        assert "Traceback" not in done.stderr, (command, done.stderr)
        if command[0] != "history":
            one_line_naming(done, store / "current")


@pytest.mark.parametrize("url", ["etcd://127.0.0.1:\u00b2/x", "etcd://127.0.0.1:\uff12\uff13\uff17\uff19/x",
                                 "nacos://127.0.0.1:\u00b2/x"])
def test_a_store_url_port_in_other_digits_is_a_usage_error(url: str) -> None:
    done = grayagent("history", "--store", url)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "is not host:port" in done.stderr


@pytest.mark.parametrize("command", [["local-revert", "--list"], ["local-revert", "--unpin"], ["audit", "verify"]])
def test_a_mistyped_state_dir_is_a_usage_error(tmp_path: Path, command: list[str]) -> None:
    """local-revert --list said "no versions cached" with exit 0; audit verify reported a lost log."""
    typo = tmp_path / "stat"
    done = grayagent(*command, "--state-dir", str(typo))
    assert done.returncode == 2, done
    one_line_naming(done, typo)
    assert not typo.exists()


def test_an_empty_store_says_nothing_is_published_yet(tmp_path: Path) -> None:
    """An existing, empty store is no mistake, but a bare table header tells a person nothing."""
    store = tmp_path / "store"
    store.mkdir()
    done = grayagent("history", "--store", str(store))
    assert (done.returncode, done.stdout) == (0, f"file://{store}: nothing published yet\n"), done
    assert grayagent("history", "--store", str(store), "-o", "json").stdout == "[]\n"
