"""Directory-store history is tamper-evident (issue 12.10): versions are chained, get(N) checks N, and
`history --verify` walks the whole chain. Through the real CLI, on a real directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grayagent.errors import StoreError
from grayagent.stores.base import digest_of
from grayagent.stores.chain import verify_chain
from grayagent.stores.envelope import entry_digest
from grayagent.stores.file import FileStore
from tests.agenthelp import grayagent
from tests.docs import document, dump, service


def publish_three(tmp_path: Path) -> tuple[Path, FileStore]:
    store_dir = tmp_path / "store"
    store = FileStore(str(store_dir))
    for n, default in enumerate(("stable", "canary", "stable"), 1):
        store.publish(dump(document(service(default=default))), n - 1, "t", f"v{n}")
    return store_dir, store


def version_file(store_dir: Path, n: int) -> Path:
    return store_dir / "versions" / f"{n:010d}.json"


def forge(store_dir: Path, n: int, **changes: str) -> None:
    """Rewrite version n as an attacker with write access would: new content, digest recomputed."""
    path = version_file(store_dir, n)
    entry = json.loads(path.read_text())
    entry.update(changes)
    entry["digest"] = digest_of(entry["content"].encode())
    path.write_text(json.dumps(entry))


def test_each_version_names_its_parents_entry_digest(tmp_path: Path) -> None:
    _, store = publish_three(tmp_path)
    v1, v2, v3 = (store.get(n).meta for n in (1, 2, 3))
    assert v1.parent_digest == ""
    assert v2.parent_digest == entry_digest(v1) and v3.parent_digest == entry_digest(v2)
    assert verify_chain(store) == []
    done = grayagent("history", "--verify", "--store", str(tmp_path / "store"))
    assert done.returncode == 0 and "history intact" in done.stdout, done.stderr


def test_rewritten_version_with_recomputed_digest_fails_verify_and_revert(tmp_path: Path) -> None:
    store_dir, _ = publish_three(tmp_path)
    evil = dump(document(service(default="canary", servers={"stable": ["10.6.6.6:80"], "canary": ["10.6.6.7:80"]})))
    forge(store_dir, 2, content=evil.decode())
    done = grayagent("history", "--verify", "--store", str(store_dir))
    assert done.returncode == 1
    assert done.stdout.splitlines()[0].startswith("version 3: parent_digest does not match version 2")
    as_json = json.loads(grayagent("history", "--verify", "--store", str(store_dir), "-o", "json").stdout)
    assert as_json["intact"] is False and as_json["breaks"][0]["version"] == 3
    before = (store_dir / "current").read_text()
    refused = grayagent("revert", "2", "--store", str(store_dir))
    assert refused.returncode != 0 and "version 2 fails the history check" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert (store_dir / "current").read_text() == before, "a refused revert publishes nothing"
    # An untouched version can still be reverted to.
    assert grayagent("revert", "1", "--store", str(store_dir)).returncode == 0


def test_edited_metadata_breaks_the_chain_too(tmp_path: Path) -> None:
    store_dir, store = publish_three(tmp_path)
    forge(store_dir, 1, author="someone else")
    assert [b.version for b in verify_chain(store)] == [2]


def test_a_version_stripped_of_its_link_is_caught(tmp_path: Path) -> None:
    store_dir, store = publish_three(tmp_path)
    forge(store_dir, 3, parent_digest="")
    assert [str(b) for b in verify_chain(store)] == [
        "version 3: has no parent_digest but its parent, version 2, is chained: version 3 was rewritten"]


def test_swapped_version_files_are_refused_by_show_and_get(tmp_path: Path) -> None:
    store_dir, store = publish_three(tmp_path)
    one, two = version_file(store_dir, 1), version_file(store_dir, 2)
    a, b = one.read_bytes(), two.read_bytes()
    one.write_bytes(b)
    two.write_bytes(a)
    with pytest.raises(StoreError, match="holds version 2, not 1"):
        store.get(1)
    shown = grayagent("show", "1", "--store", str(store_dir))
    assert shown.returncode != 0 and "holds version 2, not 1" in shown.stderr and shown.stdout == ""
    assert grayagent("history", "--verify", "--store", str(store_dir)).stdout.startswith("version 1: ")
    assert grayagent("revert", "1", "--store", str(store_dir)).returncode != 0


def test_versions_published_before_chaining_start_a_chain(tmp_path: Path) -> None:
    store_dir, store = publish_three(tmp_path)
    for n in (1, 2, 3):  # as an older grayagent wrote them: no parent_digest key at all
        path = version_file(store_dir, n)
        entry = json.loads(path.read_text())
        del entry["parent_digest"]
        path.write_text(json.dumps(entry))
    assert verify_chain(store) == []
    meta = store.publish(dump(document(service(default="canary"))), 3, "t", "v4")
    assert meta.parent_digest == entry_digest(store.get(3).meta)
    assert verify_chain(store) == []
    forge(store_dir, 3, content=store.get(2).content.decode())  # the old head is now vouched for by version 4
    assert [b.version for b in verify_chain(store)] == [4]


def test_a_fix_can_still_be_published_on_a_damaged_current_version(tmp_path: Path) -> None:
    store_dir, store = publish_three(tmp_path)
    path = version_file(store_dir, 3)
    path.write_text(path.read_text().replace('"content": "', '"content": "# edited\\n', 1))  # digest now wrong
    fix = tmp_path / "fix.yaml"
    fix.write_bytes(store.get(1).content)
    done = grayagent("publish", str(fix), "--store", str(store_dir), "--expect-version", "3", "-m", "incident fix")
    assert done.returncode == 0, done.stderr
    assert store.get(4).meta.parent_digest == "", "a damaged parent cannot be vouched for: a new chain starts"
    breaks = grayagent("history", "--verify", "--store", str(store_dir))
    assert breaks.returncode == 1 and breaks.stdout.splitlines() == [
        f"version 3: {path}: content does not match its digest"]


def test_revert_replaces_a_damaged_current_version_but_never_republishes_one(tmp_path: Path) -> None:
    store_dir, store = publish_three(tmp_path)
    path = version_file(store_dir, 3)
    path.write_text(path.read_text().replace('"content": "', '"content": "# edited\\n', 1))  # digest now wrong
    refused = grayagent("revert", "3", "--store", str(store_dir))
    assert refused.returncode != 0 and f"{path}: content does not match its digest" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and (store_dir / "current").read_text() == "3\n"

    done = grayagent("revert", "1", "--store", str(store_dir), "-m", "incident: version 3 damaged")
    assert done.returncode == 0, done.stderr
    assert (store_dir / "current").read_text() == "4\n"
    assert store.get(4).content == store.get(1).content and store.get(4).meta.parent == 3
    # And a publish without --expect-version compares against the pointer too.
    fix = tmp_path / "fix.yaml"
    fix.write_bytes(store.get(2).content)
    path4 = version_file(store_dir, 4)
    path4.write_text(path4.read_text().replace('"content": "', '"content": "# edited\\n', 1))
    done = grayagent("publish", str(fix), "--store", str(store_dir))
    assert done.returncode == 0, done.stderr
    assert store.current() is not None and store.current().version == 5


@pytest.mark.parametrize("hostile", ["[" * 100_000, '{"content": "' + "x" * 10 + '", "version": ' + "[" * 100_000])
def test_a_version_file_nested_100k_deep_is_one_line_never_a_traceback(tmp_path: Path, hostile: str) -> None:
    """json.loads raises RecursionError, which every `except ValueError` around it missed."""
    store_dir, _store = publish_three(tmp_path)
    version_file(store_dir, 2).write_text(hostile)
    for command in (["history", "--verify"], ["show", "2"], ["revert", "2"]):
        done = grayagent(*command, "--store", str(store_dir))
        assert done.returncode == 1 and "Traceback" not in done.stderr, (command, done.stderr)
        assert str(version_file(store_dir, 2)) in done.stderr.strip().splitlines()[-1]
    assert (store_dir / "current").read_text().strip() == "3", "nothing published"


def test_hostile_fleet_entries_and_request_lines_are_skipped_or_reported(tmp_path: Path) -> None:
    store_dir, _store = publish_three(tmp_path)
    (store_dir / "agents").mkdir(exist_ok=True)
    (store_dir / "agents" / "deep.json").write_text("[" * 100_000)
    (store_dir / "agents" / "odd.json").write_text('{"expires_unix": [1]}')
    done = grayagent("status", "--store", str(store_dir))
    assert "Traceback" not in done.stderr and "0 agents reporting" in done.stdout, done.stderr
    lines = "[" * 100_000 + "\n" + json.dumps({"service": "product"}) + "\n"
    done = subprocess.run([sys.executable, "-m", "grayagent.cli", "route", "--store", str(store_dir),
                           "--requests", "-"], input=lines, capture_output=True, text=True, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    first, second = (json.loads(line) for line in done.stdout.splitlines())
    assert first == {"error": "-:1: invalid JSON: nested too deeply"} and second["upstream"] == "stable"


@pytest.mark.parametrize("damage", ["delete the current version", "point current past the history"])
def test_a_current_pointer_to_a_missing_version_fails_verify(tmp_path: Path, damage: str) -> None:
    """No later version names the current one as its parent, so only the pointer can tell it is gone."""
    store_dir, store = publish_three(tmp_path)
    if damage.startswith("delete"):
        version_file(store_dir, 3).unlink()
    else:
        (store_dir / "current").write_text("7\n")
    missing = 3 if damage.startswith("delete") else 7
    assert [str(b) for b in verify_chain(store)] == [
        f"version {missing}: `current` points at version {missing}, which is missing"]
    done = grayagent("history", "--verify", "--store", str(store_dir))
    assert done.returncode == 1 and "intact" not in done.stdout, done.stdout


@pytest.mark.parametrize("number", ['"2"', "2.0", "true", "9007199254740992"])
def test_a_version_number_that_is_not_a_json_integer_is_damaged(tmp_path: Path, number: str) -> None:
    """int() would read "2", 2.0 and true as 2; past 2**53 a number is no longer exact in Lua's doubles."""
    store_dir, store = publish_three(tmp_path)
    path = version_file(store_dir, 2)
    path.write_text(path.read_text().replace('"version": 2', f'"version": {number}', 1))
    with pytest.raises(StoreError, match="malformed version envelope"):
        store.get(2)
    assert grayagent("history", "--verify", "--store", str(store_dir)).returncode == 1
