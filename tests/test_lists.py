"""Named ID lists: parsing and its errors, `file:` lists embedded at publish, the matcher's meaning, hostile
IDs in every renderer, a list change in nginx dynamic mode without a reload, and 100,000 IDs end to end."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from grayagent import proxycheck, usecases
from grayagent.errors import InvalidDocument
from grayagent.rules import idlists
from grayagent.rules.model import parse_document
from grayagent.rules.routing import Request, route
from grayagent.stores.base import digest_of
from grayagent.targets import envoy_render, nginx_dynamic_render, nginx_render
from grayagent.targets.nginx_dynamic_render import DynamicOptions
from tests.agenthelp import dynamic_target, grayagent
from tests.docs import document, dump, service
from tests.servers.envoy import envoy_binary
from tests.servers.nginx import NginxInstance, lua_available
from tests.servers.proc import free_port, wait_until


def _doc(lists: dict[str, Any], matcher: dict[str, Any] | None = None, **svc: Any) -> dict[str, Any]:
    rules = [{"name": "beta", "match": matcher or {"headers": {"X-User-Id": {"list": "beta"}}}, "to": "canary"}]
    doc = document(service(rules=rules, **svc))
    doc["spec"]["lists"] = lists
    return doc


def _problems(doc: dict[str, Any] | bytes, source: str = "rules.json") -> list[str]:
    with pytest.raises(InvalidDocument) as info:
        parse_document(doc if isinstance(doc, bytes) else dump(doc), source)
    return [str(p) for p in info.value.problems]


# ---------------------------------------------------------------------------------------------- parse


def test_a_list_matcher_holds_for_members_only_exact_and_case_sensitive() -> None:
    release = parse_document(dump(_doc({"beta": {"values": ["10001", "Abc", "中文"]}})), "rules.json")
    assert release.lists[0].name == "beta" and release.lists[0].values == ("10001", "Abc", "中文")
    svc = release.services[0]
    cond = svc.rules[0].conditions[0]
    assert cond.match.kind == "list" and cond.match.values == ("beta",)  # type: ignore[union-attr]
    assert cond.match.members == frozenset({"10001", "Abc", "中文"})  # type: ignore[union-attr]
    decide = {v: route(svc, Request.build(headers={"X-User-Id": v})).rule for v in
              ["10001", "Abc", "abc", "ABC", "中文", "1000", "100011", "", " 10001 "]}
    assert decide == {"10001": "beta", "Abc": "beta", "abc": None, "ABC": None, "中文": "beta", "1000": None,
                      "100011": None, "": None, " 10001 ": "beta"}  # proxies strip a header's outer blanks
    assert route(svc, Request.build()).rule is None


def test_each_bad_id_is_named_by_list_and_index() -> None:
    problems = _problems(_doc({"beta": {"values": ["ok", "tab\there", " lead", "trail ", "x" * 200 + "é" * 30,
                                                   "ok", "del\x7f"]}}))
    assert problems == [
        "rules.json: spec.lists.beta.values[1]: 'tab\\there' contains the control character '\\t'",
        "rules.json: spec.lists.beta.values[2]: ' lead' has leading or trailing whitespace, which proxies strip "
        "from header values",
        "rules.json: spec.lists.beta.values[3]: 'trail ' has leading or trailing whitespace, which proxies strip "
        "from header values",
        "rules.json: spec.lists.beta.values[4]: 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... is 260 bytes; an ID has 1 to "
        "256",
        "rules.json: spec.lists.beta.values[6]: 'del\\x7f' contains the control character '\\x7f'",
        "rules.json: spec.lists.beta.values[5]: 'ok' is listed twice (first at index 0)",
    ]


def test_schema_errors_name_the_field() -> None:
    assert _problems(_doc({"beta": {"values": [""]}})) == ["rules.json: spec.lists.beta.values[0]: must not be empty"]
    assert _problems(_doc({"Beta": {"values": ["1"]}}, {"headers": {"X": {"list": "x"}}}))[0].startswith(
        "rules.json: spec.lists: 'Beta' does not match")
    assert _problems(_doc({"beta": {"values": ["1"], "file": "x.txt"}})) == [
        "rules.json: spec.lists.beta: give exactly one of values, file; got values, file"]


def test_an_unknown_list_names_the_matcher() -> None:
    assert _problems(_doc({"beta": {"values": ["1"]}}, {"cookies": {"uid": {"list": "vip"}}})) == [
        "rules.json: spec.services[0].rules[0].match.cookies.uid.list: unknown list 'vip' (spec.lists)"]


def test_the_total_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idlists, "MAX_LIST_IDS", 3)
    assert _problems(_doc({"beta": {"values": ["1", "2"]}, "vip": {"values": ["3", "4"]}})) == [
        "rules.json: spec.lists: 4 IDs in all; the limit is 3"]


def test_a_stored_document_never_holds_a_file_list() -> None:
    # Agents and stores parse content without the operator's disk: a file: there is an error, not a read.
    assert _problems(_doc({"beta": {"file": "/etc/passwd"}}), "store#3") == [
        "store#3: spec.lists.beta.file: a stored document holds its IDs as values; file: is read by validate, "
        "publish and route --file from the operator's disk, relative to the document"]


# ---------------------------------------------------------------------------------------------- files


def _write(tmp_path: Path, lists: dict[str, Any], suffix: str = ".yaml") -> Path:
    path = tmp_path / "docs" / f"rules{suffix}"
    path.parent.mkdir(exist_ok=True)
    doc = _doc(lists)
    if suffix == ".yaml":
        import yaml

        path.write_text("# the operator's copy\n" + yaml.safe_dump(doc, sort_keys=False))
    else:
        path.write_bytes(dump(doc))
    return path


def test_a_file_list_is_read_relative_to_the_document_and_embedded(tmp_path: Path) -> None:
    (tmp_path / "docs" / "lists").mkdir(parents=True)
    (tmp_path / "docs" / "lists" / "beta.txt").write_bytes(
        b"# beta testers\n10001\r\n\n   \n  # indented comment\nAbc\n\xe4\xb8\xad\n10002")
    for suffix in (".yaml", ".json"):
        path = _write(tmp_path, {"beta": {"file": "lists/beta.txt"}, "vip": {"values": ["v"]}}, suffix)
        content = usecases.read_file(str(path))
        assert b"file" not in content and content.startswith(b"{") == (suffix == ".json")
        release = parse_document(content, str(path))  # what publish stores parses on its own
        assert release.lists[0].values == ("10001", "Abc", "中", "10002")
        assert release.lists[1].values == ("v",)


def test_a_document_without_file_lists_is_published_byte_for_byte(tmp_path: Path) -> None:
    path = _write(tmp_path, {"beta": {"values": ["1"]}})
    assert usecases.read_file(str(path)) == path.read_bytes()


def test_file_errors_name_the_document_the_field_the_file_and_the_line(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "bad.txt").write_bytes(b"ok\n trailing-blank-first \nctl\x01x\nok2\n")
    path = _write(tmp_path, {"beta": {"file": "bad.txt"}, "vip": {"file": "missing.txt"}})
    with pytest.raises(InvalidDocument) as info:
        usecases.read_file(str(path))
    assert [str(p) for p in info.value.problems] == [
        f"{path}: spec.lists.beta.file: bad.txt line 2: ' trailing-blank-first ' has leading or trailing "
        "whitespace, which proxies strip from header values",
        f"{path}: spec.lists.beta.file: bad.txt line 3: 'ctl\\x01x' contains the control character '\\x01'",
        f"{path}: spec.lists.vip.file: missing.txt: No such file or directory",
    ]
    (tmp_path / "docs" / "bad.txt").write_bytes(b"\xff\n")
    (tmp_path / "docs" / "missing.txt").write_bytes(b"1\n1\n")
    with pytest.raises(InvalidDocument) as again:
        usecases.read_file(str(path))
    assert [str(p) for p in again.value.problems] == [f"{path}: spec.lists.beta.file: bad.txt: not UTF-8 (byte 0)"]


def test_publish_stores_the_ids_never_the_file(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "beta.txt").write_text("10001\n10002\n")
    path = _write(tmp_path, {"beta": {"file": "beta.txt"}})
    store = tmp_path / "store"
    done = grayagent("publish", str(path), "--store", str(store), "--create")
    assert done.returncode == 0, done.stderr
    (tmp_path / "docs" / "beta.txt").unlink()  # the published version no longer needs it
    shown = grayagent("show", "--store", str(store))
    assert shown.returncode == 0, shown.stderr
    assert "file" not in shown.stdout and "10002" in shown.stdout
    assert parse_document(shown.stdout.encode(), "store").lists[0].values == ("10001", "10002")
    failed = grayagent("validate", str(path))
    assert failed.returncode != 0
    assert failed.stderr.strip().endswith("spec.lists.beta.file: beta.txt: No such file or directory")


# ---------------------------------------------------------------------------------------------- renderers

HOSTILE = ["default", "include", "hostnames", "volatile", "~x", "\\", "\\\\", '"', "';", "{}", "$x", "${x}",
           "#c", "中文", "Abc", "abc", "end\\"]


def test_hostile_ids_stay_data_in_every_renderer() -> None:
    release = parse_document(dump(_doc({"beta": {"values": HOSTILE}})), "rules.json")
    conf = nginx_render.render(release, 1, "sha256:x")
    keys = re.findall(r'^    ("(?:[^"\\]|\\.)*") "\\t', conf, re.M)
    # Every key is quoted and starts with an escaped backslash, which map strips before reading it literally.
    assert len(keys) == len(HOSTILE) - 1 and all(k.startswith('"\\\\') for k in keys)  # Abc and abc share one
    assert '"\\\\Abc" "\\tAbc\\tabc";' in conf
    assert '"\\t${ga_dollar}x";' in conf and '"\\t${ga_dollar}{x}";' in conf  # $ never starts a variable
    for text in (nginx_dynamic_render.render_data(release, 1, "sha256:x", "fp"),
                 envoy_render.render(release, 1, "sha256:x")["rds/grayagent_any_8080.json"].decode()):
        assert "~x\\n" not in text and "${x}" not in text and "中" not in text


def test_a_document_without_lists_renders_no_list_machinery() -> None:
    release = parse_document(dump(document(service())), "rules.json")
    assert "map_hash" not in nginx_render.render(release, 1, "sha256:x")
    assert "lists" not in nginx_dynamic_render.render_data(release, 1, "sha256:x", "fp")


def test_unused_lists_are_not_rendered() -> None:
    doc = _doc({"beta": {"values": ["1"]}, "unused": {"values": ["secret-id"]}})
    release = parse_document(dump(doc), "rules.json")
    for text in (nginx_render.render(release, 1, "sha256:x"),
                 nginx_dynamic_render.render_data(release, 1, "sha256:x", "fp"),
                 json.dumps(json.loads(envoy_render.render(release, 1, "sha256:x")["rds/grayagent_any_8080.json"]))):
        assert "secret-id" not in text


def test_the_dynamic_skeleton_does_not_depend_on_list_content() -> None:
    options = DynamicOptions(lua_dir="/etc/nginx/conf.d/grayagent-lua")
    one = parse_document(dump(_doc({"beta": {"values": ["1"]}})), "a")
    two = parse_document(dump(_doc({"beta": {"values": ["2", "3"]}})), "b")
    assert nginx_dynamic_render.render_skeleton(one, options) == nginx_dynamic_render.render_skeleton(two, options)


# ---------------------------------------------------------------------------------------------- real nginx


def _ask(port: int, user: str) -> str:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/", headers={"X-User-Id": user, "Connection": "close"})
    body = conn.getresponse().read().decode()
    conn.close()
    return body


def _worker_pids(nginx: NginxInstance) -> set[int]:
    master = int((nginx.root / "nginx.pid").read_text())
    return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == master}


def _ppid(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


@pytest.mark.skipif(not lua_available(), reason="lua-nginx-module is not installed")
def test_a_list_change_in_dynamic_mode_does_not_reload_nginx(tmp_path: Path, backends) -> None:
    nginx = NginxInstance(tmp_path / "nginx", lua=True).start()
    try:
        target = dynamic_target(nginx)
        port = free_port()
        servers = {"stable": [f"127.0.0.1:{backends['stable'].port}"],
                   "canary": [f"127.0.0.1:{backends['canary'].port}"]}

        def apply(version: int, ids: list[str]) -> None:
            content = dump(_doc({"beta": {"values": ids}}, listen=f"127.0.0.1:{port}", servers=servers))
            release = parse_document(content, "rules.json")
            result = target.apply(target.render(release, version, digest_of(content)), version, digest_of(content))
            assert result.ok, result.error
            assert result.reloaded == (version == 1)

        apply(1, ["u1", "u2"])
        wait_until(lambda: _ask(port, "u1") == "canary", 10, "the first list")
        workers, reloads = _worker_pids(nginx), nginx.reloads()
        apply(2, ["u2", "u3"] + [f"bulk{i}" for i in range(20_000)])
        wait_until(lambda: _ask(port, "u3") == "canary", 10, "the new list")
        assert _ask(port, "u1") == "stable" and _ask(port, "U3") == "stable" and _ask(port, "bulk19999") == "canary"
        assert nginx.reloads() == reloads and _worker_pids(nginx) == workers
    finally:
        nginx.stop()


# ---------------------------------------------------------------------------------------------- scale


def test_100k_ids_render_and_the_proxies_accept_them(tmp_path: Path) -> None:
    ids = [f"{i:08d}" if i % 3 else f"User-{i:x}" for i in range(100_000)]
    content = dump(_doc({"beta": {"values": ids}}))
    release = parse_document(content, "rules.json")
    assert len(release.lists[0].values) == 100_000
    conf = nginx_render.render(release, 1, "sha256:x")
    assert conf.count("\n") > 100_000
    data = nginx_dynamic_render.render_data(release, 1, "sha256:x", "fp")
    assert data.count("\n") < 10  # one string per list: no 100,000-entry table constructor
    proxycheck.check_nginx(release, "rules.json", os.environ.get("NGINX_BIN", "nginx"))
    proxycheck.check_envoy(release, "rules.json", envoy_binary())


def test_data_too_large_for_the_dict_is_refused_before_anything_changes(tmp_path: Path) -> None:
    from grayagent.targets.nginx_dynamic import NginxDynamicSettings, NginxDynamicTarget

    options = DynamicOptions(lua_dir="/x", dict_size="1m", max_push_size="512k")
    assert nginx_dynamic_render.data_too_large(300_000, options) is None
    assert "must hold three generations" in (nginx_dynamic_render.data_too_large(400_000, options) or "")
    assert "push limit (512k)" in (nginx_dynamic_render.data_too_large(600_000, options) or "")
    conf = tmp_path / "conf.d" / "grayagent.conf"
    conf.parent.mkdir()
    target = NginxDynamicTarget(NginxDynamicSettings(conf=conf, dict_size="1m", control_listen="127.0.0.1:1"))
    content = dump(_doc({"beta": {"values": [f"user-{i:06d}" for i in range(40_000)]}}))
    release = parse_document(content, "rules.json")
    result = target.apply(target.render(release, 1, digest_of(content)), 1, digest_of(content))
    assert not result.ok and result.error is not None and "shared dict grayagent_routes (1m)" in result.error
    assert list(conf.parent.iterdir()) == []  # nothing written


def test_case_twins_that_nginx_cannot_hold_in_one_map_value_are_refused() -> None:
    twins = ["".join(c.upper() if (i >> k) & 1 else c for k, c in enumerate("abcdefghijklmnop")) + "x" * 230
             for i in range(20)]  # 20 IDs of 246 bytes, all equal up to case
    assert _problems(_doc({"beta": {"values": ["1", *twins]}})) == [
        "rules.json: spec.lists.beta.values[17]: 'abcdEfghijklmnopxxxxxxxxxxxxxxxxxxxx... and the IDs "
        "equal to it up to ASCII case take 4216 bytes in nginx's map, over 4000: nginx compares map keys "
        "case-insensitively and keeps them together; drop some of these case variants"]
    release = parse_document(dump(_doc({"beta": {"values": twins[:16]}})), "rules.json")
    proxycheck.check_nginx(release, "rules.json", os.environ.get("NGINX_BIN", "nginx"))
