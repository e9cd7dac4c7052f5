"""nginx dynamic mode: golden skeleton and data, hostile values confined, and the agent end to end on a real
nginx with lua-nginx-module: pushes without reloads, reloads on topology changes, restarts, failed pushes.

Regenerate the goldens after an intended change with: UPDATE_GOLDEN=1 pytest tests/test_nginx_dynamic.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from grayagent.rules.model import Release, parse_document
from grayagent.rules.routing import Request, route
from grayagent.stores.base import digest_of
from grayagent.stores.file import FileStore
from grayagent.targets.nginx_control import TOKEN_FILE, push_headers, read_token
from grayagent.targets.nginx_dynamic import NginxDynamicSettings, NginxDynamicTarget
from grayagent.targets.nginx_dynamic_render import (
    DATA_FILE,
    PUSH_PATH,
    DynamicOptions,
    fingerprint,
    render,
    render_data,
    render_skeleton,
)
from tests.agenthelp import Client, agent_config, dynamic_target, grayagent, running_agent_for, start_agent
from tests.docs import document, dump, service
from tests.servers.nginx import LUA_MODULE, NginxInstance, lua_available
from tests.servers.proc import free_port, wait_until

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "rules.yaml").exists())
OPTIONS = DynamicOptions(lua_dir="/etc/nginx/conf.d/grayagent-lua", control_listen="127.0.0.1:18089")

needs_lua = pytest.mark.skipif(not lua_available(), reason=f"lua-nginx-module is not installed ({LUA_MODULE} "
                                                           "is absent; Debian: libnginx-mod-http-lua)")


def _release(case: str) -> tuple[Release, str]:
    content = (GOLDEN / case / "rules.yaml").read_bytes()
    return parse_document(content, f"{case}/rules.yaml"), digest_of(content)


# ---------------------------------------------------------------------------------------------- pure


@pytest.mark.parametrize("case", CASES)
def test_render_matches_golden(case: str) -> None:
    release, digest = _release(case)
    files = render(release, 7, digest, OPTIONS)
    golden = GOLDEN / case / "nginx-dynamic"
    wanted = {"grayagent.conf": files["grayagent.conf"], DATA_FILE: files[DATA_FILE]}
    if os.environ.get("UPDATE_GOLDEN"):
        golden.mkdir(exist_ok=True)
        for name, content in wanted.items():
            (golden / name).write_bytes(content)
    for name, content in wanted.items():
        assert (golden / name).read_bytes() == content, f"{case}/{name} changed; UPDATE_GOLDEN=1 if intended"
    assert render(release, 7, digest, OPTIONS) == files
    for content in wanted.values():
        assert all(b == 0x0A or 0x20 <= b < 0x7F for b in content)


def test_fingerprint_is_topology_only() -> None:
    servers = {"stable": ["127.0.0.1:9001"], "canary": ["127.0.0.1:9002"]}

    def fp(**extra: object) -> str:
        svc = service(listen=8080, servers=servers, **extra)
        return fingerprint(parse_document(dump(document(svc)), "t"), OPTIONS)

    base = fp()
    live = [fp(split={"key": {"header": "X-U"}, "weights": {"stable": 10, "canary": 90}}),
            fp(rules=[{"name": "r", "match": {"headers": {"X-A": {"exact": "1"}}}, "to": "canary"}]),
            fp(default="canary")]
    assert live == [base] * 3, "rules, weights and the default are pushed, not reloaded"
    assert fp(hosts=["a.example"]) != base
    svc = service(listen=8081, servers=servers)
    assert fingerprint(parse_document(dump(document(svc)), "t"), OPTIONS) != base
    more = service(listen=8080, servers={**servers, "canary": ["127.0.0.1:9002", "127.0.0.1:9003"]})
    assert fingerprint(parse_document(dump(document(more)), "t"), OPTIONS) != base


# 1 KB of everything that could end a Lua string or long bracket, or reach nginx: quotes, ]], $var, \\.
LONG = ('x]]"\'$host${x}\\;{}]=]' * 80)[:1024]


def test_hostile_values_stay_inside_lua_strings() -> None:
    release, digest = _release("hostile")
    doc = yaml.safe_load((GOLDEN / "hostile" / "rules.yaml").read_text())
    doc["spec"]["services"][0]["rules"].append({"name": "long", "to": "canary", "match": {"headers": {
        "X-Long": {"in": [LONG, LONG + "\t]]\t" + LONG]}}}})
    release = parse_document(json.dumps(doc).encode(), "hostile")
    data = render_data(release, 7, digest, fingerprint(release, OPTIONS))
    assert len(data) > 3 * 1024
    skeleton = render_skeleton(release, OPTIONS)
    assert 'return 200 "pwned"' not in data + skeleton and "listen 1;" not in data + skeleton
    assert "$host" not in data and "]]" not in data and "\r" not in data
    # Every string in the data is "..." of safe bytes and \ddd escapes: nothing a value could have closed.
    strings = re.findall(r'"((?:[^"\\]|\\.)*)"', data)
    assert strings and all(re.fullmatch(r"(?:[A-Za-z0-9 _./:@-]|\\[0-9]{3})*", s) for s in strings)
    assert skeleton.count("server {") == 2 and "access_by_lua_block" in skeleton


def test_control_server_is_loopback_only() -> None:
    release, _ = _release("shop")
    skeleton = render_skeleton(release, OPTIONS)
    control = skeleton[skeleton.index("# The agent's control server"):]
    assert "    listen 127.0.0.1:18089;\n" in control
    assert control.index("allow 127.0.0.0/8;") < control.index("allow ::1;") < control.index("deny all;")
    assert f"location = {PUSH_PATH}" in control
    from grayagent.errors import UsageError

    with pytest.raises(UsageError, match="loopback"):
        NginxDynamicTarget(NginxDynamicSettings(conf=Path("/tmp/x/grayagent.conf"), control_listen="0.0.0.0:18090"))


# ---------------------------------------------------------------------------------------------- real nginx


@pytest.fixture
def lua_nginx(tmp_path: Path) -> Iterator[NginxInstance]:
    instance = NginxInstance(tmp_path / "nginx", lua=True).start()
    yield instance
    instance.stop()


def _signed(target: NginxDynamicTarget, body: bytes, epoch: int = 0) -> dict[str, str]:
    """The headers of a push as this host's agent signs it."""
    token = read_token(target.token_path)
    assert token is not None
    return push_headers(token, epoch, body)


def apply_doc(target: NginxDynamicTarget, doc: dict, version: int = 1) -> None:
    content = dump(doc)
    result = target.apply(target.render(parse_document(content, "t"), version, digest_of(content)), version,
                          digest_of(content))
    assert result.ok, result.error


@needs_lua
@pytest.mark.parametrize("case", CASES)
def test_real_nginx_accepts_skeleton_and_data(case: str, tmp_path: Path) -> None:
    """Every golden case: the skeleton passes nginx -t, nginx accepts the data, and reports its version."""
    content = (GOLDEN / case / "rules.yaml").read_bytes()
    doc = parse_document(content, case)
    # Move the services to free loopback ports so the real nginx can bind them.
    services = tuple(dataclasses.replace(s, listen=dataclasses.replace(s.listen, host="127.0.0.1", port=free_port()))
                     for s in doc.services)
    release = dataclasses.replace(doc, services=services)
    nginx = NginxInstance(tmp_path / "nginx", lua=True).start()
    try:
        target = dynamic_target(nginx)
        result = target.apply(target.render(release, 3, digest_of(content)), 3, digest_of(content))
        assert result.ok, result.error
        assert target.live_version() == (3, digest_of(content))
    finally:
        nginx.stop()


@needs_lua
def test_hostile_document_routes_like_the_simulator(lua_nginx: NginxInstance, backends) -> None:
    port = free_port()
    raw = (GOLDEN / "hostile" / "rules.yaml").read_text()
    servers = f'["127.0.0.1:{backends["stable"].port}"]', f'["127.0.0.1:{backends["canary"].port}"]'
    raw = (raw.replace("listen: 18080", f"listen: 127.0.0.1:{port}").replace('["127.0.0.1:9001"]', servers[0])
           .replace('["127.0.0.1:9002"]', servers[1]))
    doc = yaml.safe_load(raw)
    doc["spec"]["services"][0]["rules"].append({"name": "long", "to": "canary",
                                                 "match": {"headers": {"X-Long": {"exact": LONG}}}})
    raw = json.dumps(doc)
    release = parse_document(raw.encode(), "hostile")
    target = dynamic_target(lua_nginx)
    result = target.apply(target.render(release, 1, digest_of(raw.encode())), 1, digest_of(raw.encode()))
    assert result.ok, result.error
    svc = release.services[0]
    client = Client(port)
    cases = [{"X-A": 'a"; return 200 "pwned"; #'}, {"X-A": "a"}, {"Cookie": "s.id-x=} server { listen 1 }"},
             {"Cookie": "s.id-x={"}, {"X-C": '"$;{}"\\'}, {"X-C": '"x"\\'}, {}]
    for headers in cases:
        want = route(svc, Request.build(headers=headers)).upstream
        assert client.get("/", headers)[1] == want, headers
    assert client.get("/?q=$host${request_uri}\\x")[1] == "canary"
    long_value = "k" * 1024
    assert client.get("/", {"X-A": long_value})[1] == route(svc, Request.build(headers={"X-A": long_value})).upstream
    assert client.get("/", {"X-Long": LONG})[1] == "canary"
    assert client.get("/", {"X-Long": LONG[:-1]})[1] == "stable"


@needs_lua
def test_regexes_run_on_bytes_like_nginx_map(lua_nginx: NginxInstance, backends) -> None:
    """ngx.re.find without the "u" flag: `.` is one byte, as in nginx's map regexes and routing.route."""
    port = free_port()
    servers = {n: [f"127.0.0.1:{b.port}"] for n, b in backends.items()}
    doc = document(service(listen=f"127.0.0.1:{port}", servers=servers, rules=[
        {"name": "one-byte", "match": {"headers": {"X-One": {"regex": "^.$"}}}, "to": "canary"},
        {"name": "two-bytes", "match": {"headers": {"X-One": {"regex": "^..$"}}}, "to": "beta"}]))
    apply_doc(dynamic_target(lua_nginx), doc)
    svc = parse_document(dump(doc), "t").services[0]
    client = Client(port)
    for value in ("a", "é", "ab", "中", ""):
        want = route(svc, Request.build(headers={"X-One": value})).upstream
        assert client.get("/", {"X-One": value})[1] == want, value
    assert client.get("/", {"X-One": "é"})[1] == "beta"


@needs_lua
def test_random_splits(lua_nginx: NginxInstance, backends) -> None:
    """Without a key, or with whenKeyMissing: random and no key value: a uniform random bucket per request."""
    ports = free_port(), free_port()
    servers = {n: [f"127.0.0.1:{b.port}"] for n, b in backends.items()}
    doc = document(
        service("keyless", listen=f"127.0.0.1:{ports[0]}", servers=servers,
                split={"weights": {"stable": 50, "canary": 50, "beta": 0}}),
        service("keyed", listen=f"127.0.0.1:{ports[1]}", servers=servers,
                split={"key": {"cookie": "uid"}, "whenKeyMissing": "random",
                       "weights": {"stable": 30, "canary": 0, "beta": 70}}))
    apply_doc(dynamic_target(lua_nginx), doc)
    keyed = parse_document(dump(doc), "t").service("keyed")
    keyless, with_key = Client(ports[0]), Client(ports[1])
    assert {keyless.get("/")[1] for _ in range(200)} == {"stable", "canary"}
    assert {with_key.get("/")[1] for _ in range(200)} == {"stable", "beta"}
    for uid in ("a", "b", "c", "d", "e"):
        want = route(keyed, Request.build(cookies={"uid": uid})).upstream
        assert with_key.get("/", {"Cookie": f"uid={uid}"})[1] == want


@needs_lua
def test_push_endpoint_refuses_code_and_garbage(lua_nginx: NginxInstance, backends) -> None:
    """Data runs in an empty environment: a chunk that calls anything fails; a shape mismatch is refused."""
    port = free_port()
    servers = {n: [f"127.0.0.1:{b.port}"] for n, b in backends.items()}
    target = dynamic_target(lua_nginx)
    apply_doc(target, document(service(listen=f"127.0.0.1:{port}", servers=servers)))
    url = f"http://{lua_nginx.verify_listen}{PUSH_PATH}"
    good = target.render(parse_document(dump(document(service(listen=f"127.0.0.1:{port}", servers=servers))),
                                        "d"), 9, "sha256:" + "0" * 64)[DATA_FILE]
    # Without this host's token nobody may push, not even valid data (any local process, an SSRF...).
    for token in (None, "0" * 64):
        headers = {"X-Grayagent-Token": token} if token else {}
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, data=good, method="POST", headers=headers), timeout=5)
        assert refused.value.code == 403
    assert oct((lua_nginx.conf.parent / TOKEN_FILE).stat().st_mode & 0o777) == "0o600"
    # With it, data still runs in an empty environment, bytecode is refused, and the shape is checked.
    bytecode = b"\x1bLJ\x02" + b"\x00" * 16
    for body in (b'os.execute("touch /tmp/pwned") return {}', b"return {version = 1}", b"not lua at all", bytecode,
                 b'return {version = 2, digest = "d", fingerprint = "f", services = {x = {upstreams = {}}}}'):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST",
                                                          headers=_signed(target, body)), timeout=5)
        assert refused.value.code == 400, body
    assert target.live_version() is not None and target.live_version()[0] == 1  # type: ignore[index]
    assert Client(port).get("/")[0] == 200


# ---------------------------------------------------------------------------------------------- agent


def _doc(backends, port: int, weights: dict[str, float], listen_host: str = "127.0.0.1", **extra) -> dict:
    servers = {name: [f"127.0.0.1:{b.port}"] for name, b in backends.items()}
    return document(service(listen=f"{listen_host}:{port}", servers=servers,
                            split={"key": {"header": "X-User-Id"}, "weights": weights}, **extra))


def _publish(store: FileStore, doc: dict) -> int:
    current = store.current()
    return store.publish(dump(doc), current.version if current else 0, "test", "").version


def _audit(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]


@needs_lua
def test_agent_pushes_rule_and_weight_changes_without_reloads(tmp_path: Path, lua_nginx: NginxInstance,
                                                              backends) -> None:
    port = free_port()
    store = FileStore(str(tmp_path / "store"))
    target = dynamic_target(lua_nginx)
    _publish(store, _doc(backends, port, {"stable": 100, "canary": 0, "beta": 0}))
    with running_agent_for(store, target, tmp_path / "state", min_apply_interval=0.05, resync_interval=0.3):
        wait_until(lambda: (target.live_version() or (0, ""))[0] == 1, 15, "version 1")
        client = Client(port)
        assert client.get("/", {"X-User-Id": "u1"})[1] == "stable"
        reloads = lua_nginx.reloads()

        # A weight change and a new rule: pushed, served on the same keep-alive connection, no reload.
        _publish(store, _doc(backends, port, {"stable": 0, "canary": 100, "beta": 0},
                             rules=[{"name": "vip", "match": {"headers": {"X-Tag": {"in": ["vip"]}}}, "to": "beta"}]))
        wait_until(lambda: client.get("/", {"X-User-Id": "u1"})[1] == "canary", 10, "the weight change")
        assert client.get("/", {"X-User-Id": "u1", "X-Tag": "vip"})[1] == "beta"
        # A blue-green switch of the default: pushed too.
        _publish(store, _doc(backends, port, {"stable": 0, "canary": 100, "beta": 0}, default="beta"))
        wait_until(lambda: client.get("/")[1] == "beta", 10, "the default switch")
        assert lua_nginx.reloads() == reloads, "rule, weight and default changes must not reload nginx"

        # A topology change (another upstream, so other upstream servers) reloads once. The new skeleton's
        # data is pushed before the reload: no request meets a new worker without data (the default, beta).
        answers: list[str] = []
        done = threading.Event()

        def probe() -> None:
            while not done.is_set():
                fresh = Client(port)
                answers.append(fresh.get("/", {"X-User-Id": "u1"})[1])
                fresh.close()

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        doc = _doc(backends, port, {"stable": 0, "canary": 100, "beta": 0}, default="beta")
        doc["spec"]["services"][0]["upstreams"]["extra"] = {"servers": [f"127.0.0.1:{backends['stable'].port}"]}
        version = _publish(store, doc)
        wait_until(lambda: (target.live_version() or (0, ""))[0] == version, 15, "the topology change")
        time.sleep(0.3)  # past the old workers' retirement
        done.set()
        prober.join(10)
        assert lua_nginx.reloads() == reloads + 1
        assert len(answers) > 20 and set(answers) == {"canary"}, sorted(set(answers))
        assert Client(port).get("/", {"X-User-Id": "u1"})[1] == "canary"

    applies = [e for e in _audit(tmp_path / "state") if e["event"] == "apply"]
    assert all(a["result"] == "ok" for a in applies)
    assert [("reload" in a["steps_ms"]) for a in applies] == [True, False, False, True]
    assert "push" in applies[1]["steps_ms"] and "check" not in applies[1]["steps_ms"]
    assert "check" in applies[2]["steps_ms"], "a new default rewrites the skeleton: nginx -t, still no reload"


@needs_lua
def test_restart_serves_defaults_until_the_agent_pushes_again(tmp_path: Path, lua_nginx: NginxInstance,
                                                              backends) -> None:
    port = free_port()
    store = FileStore(str(tmp_path / "store"))
    target = dynamic_target(lua_nginx)
    _publish(store, _doc(backends, port, {"stable": 0, "canary": 100, "beta": 0}))
    state = tmp_path / "state"
    with running_agent_for(store, target, state, resync_interval=60) as agent:
        wait_until(lambda: agent.health()[0], 15, "healthy")
        assert Client(port).get("/", {"X-User-Id": "u1"})[1] == "canary"
    # nginx restarts while no agent runs: the shared dict is empty; the skeleton's default answers.
    lua_nginx.restart()
    wait_until(lambda: target.live_state() is not None, 10, "nginx back")
    assert target.live_version() is None
    client = Client(port)
    answers = {client.get("/", {"X-User-Id": f"u{i}"}) for i in range(50)}
    assert answers == {(200, "stable")}, "no data yet: the default upstream, never an error"
    with running_agent_for(store, target, state, resync_interval=60) as agent:
        wait_until(lambda: agent.health()[0], 15, "healthy again")
        assert client.get("/", {"X-User-Id": "u1"})[1] == "canary"
        reloads = lua_nginx.reloads()
        # nginx restarts under a running agent: it notices on its next sync and pushes again.
        lua_nginx.restart()
        wait_until(lambda: target.live_state() is not None, 10, "nginx back")
        agent.changed()
        wait_until(lambda: any(e.get("source") == "drift" for e in _audit(state)), 15, "the drift repair")
        wait_until(lambda: agent.health()[0], 15, "healthy after re-push")
        assert Client(port).get("/", {"X-User-Id": "u1"})[1] == "canary"
        assert lua_nginx.reloads() == reloads, "re-pushing needs no reload"
    repairs = [e for e in _audit(state) if e.get("source") == "drift"]
    assert [(e["result"], "reload" in e["steps_ms"], "push" in e["steps_ms"]) for e in repairs] == [("ok", False, True)]


@needs_lua
def test_failed_push_restores_last_good(tmp_path: Path, lua_nginx: NginxInstance, backends) -> None:
    """A version too large for the shared dict is refused (by the agent before it pushes, and by nginx when
    pushed anyway); the data in use stays."""
    port = free_port()
    store = FileStore(str(tmp_path / "store"))
    target = dynamic_target(lua_nginx, dict_size="64k")
    _publish(store, _doc(backends, port, {"stable": 0, "canary": 100, "beta": 0}))
    state = tmp_path / "state"
    with running_agent_for(store, target, state, min_apply_interval=0.05, retry_initial=60) as agent:
        wait_until(lambda: agent.health()[0], 15, "healthy")
        huge = [f"{i:04d}" + "v" * 1020 for i in range(150)]  # ~150 KB of `in` values
        version = _publish(store, _doc(backends, port, {"stable": 100, "canary": 0, "beta": 0},
                                       rules=[{"name": "big", "match": {"headers": {"X-A": {"in": huge}}},
                                               "to": "beta"}]))
        wait_until(lambda: agent.status.failures >= 1, 15, "the failed apply")
        assert target.live_version() is not None and target.live_version()[0] == version - 1  # type: ignore[index]
        assert Client(port).get("/", {"X-User-Id": "u1"})[1] == "canary"
        # The same refusal straight at the endpoint: a full dict leaves the data in use untouched.
        release = parse_document(store.current().content, "big")  # type: ignore[union-attr]
        files = target.render(release, version, store.current().meta.digest)  # type: ignore[union-attr]
        with pytest.raises(urllib.error.HTTPError) as full:
            urllib.request.urlopen(urllib.request.Request(f"http://{lua_nginx.verify_listen}{PUSH_PATH}",
                                                          data=files[DATA_FILE], method="POST",
                                                          headers=_signed(target, files[DATA_FILE])), timeout=5)
        assert full.value.code == 507
        for _ in range(20):
            assert target.live_version()[0] == version - 1  # type: ignore[index]
            assert Client(port).get("/", {"X-User-Id": "u1"})[1] == "canary"
    failed = [e for e in _audit(state) if e["event"] == "apply" and e["result"] == "failed"]
    # The agent sees the data cannot fit before it pushes (nginx_dynamic_render.data_too_large): one line,
    # nothing changed, so nothing to restore.
    assert failed and "shared dict" in failed[0]["error"] and "steps_ms" in failed[0], failed


def test_dynamic_mode_without_the_lua_module_fails_cleanly(nginx: NginxInstance, backends) -> None:
    """An nginx without lua-nginx-module: nginx -t names the missing module, and the last-good file stays."""
    before = nginx.conf.read_bytes()
    target = dynamic_target(nginx)
    content = dump(document(service(listen=f"127.0.0.1:{free_port()}",
                                    servers={n: [f"127.0.0.1:{b.port}"] for n, b in backends.items()})))
    result = target.apply(target.render(parse_document(content, "t"), 1, digest_of(content)), 1, digest_of(content))
    assert not result.ok and result.restored and not result.reloaded
    assert "libnginx-mod-http-lua" in (result.error or "")
    assert nginx.conf.read_bytes() == before


def test_nginx_mode_from_flag_env_and_config_file(tmp_path: Path) -> None:
    from grayagent.errors import UsageError
    from grayagent.runtime import agentrun
    from grayagent.targets.nginx import NginxTarget

    base = {"state_dir": str(tmp_path / "state"), "nginx_conf": str(tmp_path / "conf.d" / "grayagent.conf")}
    assert isinstance(agentrun.build_target(agentrun.resolve_options(base, None, {})), NginxTarget)
    flagged = agentrun.resolve_options({**base, "nginx_mode": "dynamic"}, None, {})
    assert isinstance(agentrun.build_target(flagged), NginxDynamicTarget)
    env = agentrun.resolve_options(base, None, {"GRAYAGENT_NGINX_MODE": "dynamic"})
    assert env.nginx_mode == "dynamic"
    config = tmp_path / "agent.yaml"
    config.write_text("nginx_mode: dynamic\n")
    assert agentrun.resolve_options(base, str(config), {}).nginx_mode == "dynamic"
    config.write_text("nginx_mode: fast\n")
    with pytest.raises(Exception, match="nginx_mode"):
        agentrun.resolve_options(base, str(config), {})
    with pytest.raises(UsageError, match="reload or dynamic"):
        agentrun.resolve_options({**base, "nginx_mode": "fast"}, None, {})
    logging = agentrun.resolve_options({**base, "nginx_mode": "dynamic", "nginx_access_log": "/tmp/a.log"}, None, {})
    target = agentrun.build_target(logging)
    assert isinstance(target, NginxDynamicTarget) and target.traffic is not None


@needs_lua
def test_access_log_feeds_per_upstream_figures(tmp_path: Path, lua_nginx: NginxInstance, backends) -> None:
    """--nginx-access-log works in dynamic mode too: $proxy_host is the upstream Lua chose."""
    port = free_port()
    store = FileStore(str(tmp_path / "store"))
    servers = {n: [f"127.0.0.1:{backends[n].port}"] for n in ("stable", "canary")}
    _publish(store, document(service(listen=f"127.0.0.1:{port}", servers=servers,
                                     split={"weights": {"stable": 50, "canary": 50}})))
    target = dynamic_target(lua_nginx, access_log=tmp_path / "access.json")
    assert "access_log " + str(tmp_path / "access.json") + " grayagent_json;" in target.render(
        parse_document(store.current().content, "t"), 1, "d")["grayagent.conf"].decode()  # type: ignore[union-attr]
    with running_agent_for(store, target, tmp_path / "state", status_interval=0.2) as agent:
        wait_until(lambda: agent.health()[0], 15, "healthy")
        client = Client(port)
        answers = [client.get("/")[1] for _ in range(200)]

        def counted() -> dict:
            fleet = store.fleet()
            return fleet[0].get("traffic", {}).get("upstreams", {}) if fleet else {}

        wait_until(lambda: sum(u["requests"] for u in counted().values()) == 200, 10, "200 requests counted")
        ups = counted()
        assert ups["product/canary"]["requests"] == answers.count("canary") > 0
        assert ups["product/stable"]["requests"] == answers.count("stable") > 0


@needs_lua
def test_a_skeleton_left_by_a_crash_is_never_restored(lua_nginx: NginxInstance, backends) -> None:
    """An agent killed after writing a skeleton but before checking it leaves an unchecked file; a later
    failed apply must restore the skeleton nginx last verifiably served."""
    port = free_port()
    servers = {n: [f"127.0.0.1:{b.port}"] for n, b in backends.items()}
    target = dynamic_target(lua_nginx)
    apply_doc(target, document(service(listen=f"127.0.0.1:{port}", servers=servers)))
    verified = lua_nginx.conf.read_bytes()
    lua_nginx.conf.write_text("upstream broken { server does-not-resolve.invalid:80; }\n")  # the crash's leftover
    broken = document(service(listen=f"127.0.0.1:{port}", servers={**servers, "canary": ["unresolvable.invalid:80"]}))
    content = dump(broken)
    result = target.apply(target.render(parse_document(content, "t"), 2, digest_of(content)), 2, digest_of(content))
    assert not result.ok and result.restored
    assert lua_nginx.conf.read_bytes() == verified
    assert lua_nginx.test_config().returncode == 0


# ---------------------------------------------------------------------------------------------- push secret


@needs_lua
def test_no_rendered_file_holds_the_push_token(lua_nginx: NginxInstance, backends) -> None:
    """The token is read by nginx's master from its 0600 file: not in the skeleton (0640), its last-good
    copy, the data, the Lua modules, nor `nginx -T`. And building the target writes nothing."""
    token_file = lua_nginx.conf.parent / ".grayagent-control-token"
    target = dynamic_target(lua_nginx)
    assert not token_file.exists(), "a constructor only builds"
    port = free_port()
    apply_doc(target, document(service(listen=f"127.0.0.1:{port}",
                                       servers={n: [f"127.0.0.1:{b.port}"] for n, b in backends.items()})))
    token = token_file.read_text().strip()
    assert len(token) == 64 and oct(token_file.stat().st_mode & 0o777) == "0o600"
    scanned = [p for p in lua_nginx.root.rglob("*") if p.is_file() and p != token_file]
    assert len(scanned) > 5
    assert [p for p in scanned if token.encode() in p.read_bytes()] == []
    dumped = subprocess.run([lua_nginx.binary, "-T", "-c", str(lua_nginx.main_conf)], capture_output=True, text=True,
                            check=True)
    assert str(token_file) in dumped.stdout and token not in dumped.stdout + dumped.stderr
    assert Client(port).get("/")[0] == 200


@needs_lua
def test_a_replayed_push_is_refused_and_a_local_revert_still_works(lua_nginx: NginxInstance, backends) -> None:
    port = free_port()
    target = dynamic_target(lua_nginx)
    first = _doc(backends, port, {"stable": 100, "canary": 0, "beta": 0})
    second = _doc(backends, port, {"stable": 0, "canary": 100, "beta": 0})
    apply_doc(target, first, version=1)
    body_1 = target.render(parse_document(dump(first), "t"), 1, digest_of(dump(first)))[DATA_FILE]
    apply_doc(target, second, version=2)
    body_2 = target.render(parse_document(dump(second), "t"), 2, digest_of(dump(second)))[DATA_FILE]
    client = Client(port)
    assert client.get("/", {"X-User-Id": "u1"})[1] == "canary"

    def replay(body: bytes) -> int:
        """The same bytes and headers the agent sent for that version (the signature is deterministic)."""
        url = f"http://{lua_nginx.verify_listen}{PUSH_PATH}"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST",
                                                          headers=_signed(target, body)), timeout=5)
        return refused.value.code

    assert replay(body_1) == 409, "an old push, replayed, must not roll routing back"
    assert target.live_version() == (2, digest_of(dump(second)))
    assert client.get("/", {"X-User-Id": "u1"})[1] == "canary"
    # The agent itself going back (local-revert, a pin): it signs the next epoch, and nginx takes it.
    apply_doc(target, first, version=1)
    assert target.live_version() == (1, digest_of(dump(first)))
    assert client.get("/", {"X-User-Id": "u1"})[1] == "stable"
    assert replay(body_2) == 409, "a push of the epoch before the revert is a replay too"
    assert client.get("/", {"X-User-Id": "u1"})[1] == "stable"
    apply_doc(target, second, version=3)  # and forward again from there
    assert client.get("/", {"X-User-Id": "u1"})[1] == "canary"


@needs_lua
def test_local_revert_through_the_cli_goes_back_and_unpin_forward(tmp_path: Path, lua_nginx: NginxInstance,
                                                                   backends) -> None:
    """Break-glass in dynamic mode: `local-revert` pushes an older version (the next epoch), which nginx takes;
    the push it replaced cannot be replayed; `--unpin` brings the current version back."""
    port = free_port()
    store = FileStore(str(tmp_path / "store"))
    target = dynamic_target(lua_nginx)
    config = agent_config(tmp_path, tmp_path / "store", lua_nginx, nginx_mode="dynamic")
    agent = start_agent(config, tmp_path / "agent.log")
    try:
        _publish(store, _doc(backends, port, {"stable": 100, "canary": 0, "beta": 0}))
        wait_until(lambda: (target.live_version() or (0, ""))[0] == 1, 15, "version 1")
        second = _doc(backends, port, {"stable": 0, "canary": 100, "beta": 0})
        _publish(store, second)
        wait_until(lambda: (target.live_version() or (0, ""))[0] == 2, 15, "version 2")
        done = grayagent("local-revert", "1", "--config", str(config), "-m", "canary broke")
        assert done.returncode == 0, done.stderr
        assert (target.live_version() or (0, ""))[0] == 1
        assert Client(port).get("/", {"X-User-Id": "u1"})[1] == "stable"
        body_2 = target.render(parse_document(dump(second), "t"), 2, digest_of(dump(second)))[DATA_FILE]
        with pytest.raises(urllib.error.HTTPError) as replayed:
            urllib.request.urlopen(urllib.request.Request(f"http://{lua_nginx.verify_listen}{PUSH_PATH}", data=body_2,
                                                          method="POST", headers=_signed(target, body_2)), timeout=5)
        assert replayed.value.code == 409
        assert grayagent("local-revert", "--unpin", "--config", str(config)).returncode == 0
        wait_until(lambda: (target.live_version() or (0, ""))[0] == 2, 15, "version 2 again after unpin")
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(20) == 0
