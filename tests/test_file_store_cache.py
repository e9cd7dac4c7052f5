"""The agent's version cache is kept per store (issue 13): a host moved between stores never mixes versions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grayagent.errors import UsageError
from grayagent.runtime.cache import cached_versions, load_cache, save_cache
from grayagent.stores.base import VersionMeta, VersionRecord, digest_of
from grayagent.stores.urls import store_identity
from tests.agenthelp import grayagent


def record(version: int, text: str) -> VersionRecord:
    content = text.encode()
    return VersionRecord(VersionMeta(version, version - 1, "2026-01-01T00:00:00.000000Z", "t", text,
                                     digest_of(content)), content)


def test_versions_of_two_stores_never_mix(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store_a, store_b = str(tmp_path / "a"), "etcd://10.0.0.1:2379,10.0.0.2:2379/grayagent/shop"
    for n in (1, 2, 3):
        save_cache(state, store_a, record(n, f"a{n}"))
    save_cache(state, store_b, record(1, "b1"))
    assert [r.content for r in cached_versions(state, store_a)] == [b"a1", b"a2", b"a3"]
    assert [r.content for r in cached_versions(state, store_b)] == [b"b1"]
    last = load_cache(state, store_b)
    assert last is not None and last.content == b"b1"
    assert load_cache(state, "etcd://10.0.0.1:2379/grayagent/other") is None
    with pytest.raises(UsageError, match="holds versions of 2 stores"):
        cached_versions(state, None)  # which one? guessing could restore the other store's version


def test_one_store_has_one_identity_however_its_url_is_written(tmp_path: Path) -> None:
    assert store_identity(str(tmp_path / "s")) == store_identity(f"file://{tmp_path}/s")
    etcd = store_identity("etcd://10.0.0.1:2379,10.0.0.2:2379/grayagent/shop")
    assert store_identity("etcds://ops@10.0.0.2:2379,10.0.0.1:2379/grayagent/shop/?password_file=/p&timeout=2") == etcd
    nacos = store_identity("nacos://h:8848/shop")
    assert store_identity("nacos://ops@h:8848/shop?group=GRAYAGENT&namespace=public&user=ops") == nacos
    assert store_identity("nacos://h:8848/shop?group=OTHER") != nacos


def test_local_revert_lists_only_the_configured_stores_versions(tmp_path: Path) -> None:
    state = tmp_path / "state"
    old_store, new_store = tmp_path / "old", tmp_path / "new"
    for n in (1, 2, 3, 4):
        save_cache(state, str(old_store), record(n, f"old{n}"))
    save_cache(state, str(new_store), record(1, "new1"))
    config = tmp_path / "agent.yaml"
    config.write_text(f"store: {new_store}\nstate_dir: {state}\nnginx_conf: {tmp_path / 'ga.conf'}\n")
    done = grayagent("local-revert", "--list", "--config", str(config), "-o", "json")
    assert done.returncode == 0, done.stderr
    assert [(v["version"], v["message"]) for v in json.loads(done.stdout)] == [(1, "new1")]
    refused = grayagent("local-revert", "3", "--config", str(config))
    assert refused.returncode == 2 and "(cached: 1)" in refused.stderr


def test_damaged_cache_entries_are_ignored(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = str(tmp_path / "s")
    save_cache(state, store, record(1, "one"))
    save_cache(state, store, record(2, "two"))
    [entry] = [p for p in (state / "cache").glob("*/0000000002.json")]
    entry.write_text(entry.read_text().replace('"two"', '"evil"', 1).replace('"content": "two"', '"content": "x"'))
    assert [r.version for r in cached_versions(state, store)] == [1]
    swapped = entry.with_name("0000000001.json")
    swapped.write_text(entry.with_name("last-good.json").read_text())  # version 2's envelope under number 1
    assert cached_versions(state, store) == []
