"""The Nacos store against one real Nacos 3.1 server (auth on), with agents driving real nginx instances.

One server serves the whole module (start-up costs ~8 s); every test uses its own release name.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from grayagent.errors import Conflict, StoreError, UsageError
from grayagent.stores.base import digest_of
from grayagent.stores.nacos import NacosStore, parse_url, redact
from tests.agenthelp import Client, grayagent, running_agent, wait_live
from tests.docs import document, dump, service
from tests.servers.backends import Backend
from tests.servers.nacos import NacosServer, nacos_unavailable_reason
from tests.servers.nginx import NginxInstance
from tests.servers.proc import free_port, wait_until

GROUP = "GRAYAGENT"
pytestmark = pytest.mark.filterwarnings("ignore:ssl:DeprecationWarning")  # nacos-sdk-python's ssl.SSLContext()


@pytest.fixture(scope="module")
def nacos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NacosServer]:
    reason = nacos_unavailable_reason()
    if reason is not None:
        pytest.skip(f"Nacos tests need Java 17+ and Maven: {reason}")
    # Spring's graceful shutdown would wait up to 30 s for agents' held listener requests on every stop.
    with NacosServer(tmp_path_factory.mktemp("nacos"), extra_properties={"server.shutdown": "immediate"}) as server:
        yield server


@pytest.fixture(scope="module")
def password_file(nacos: NacosServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "nacos-password"
    path.write_text(nacos.password + "\n")
    path.chmod(0o600)
    return path


def url(nacos: NacosServer, release: str, password_file: Path | None = None, **query: str) -> str:
    """The store URL; with `password_file` the password comes from it, else from $GRAYAGENT_NACOS_PASSWORD."""
    options = {"user": nacos.username, **query}
    if password_file is not None:
        options["password_file"] = str(password_file)
    return f"nacos://{nacos.server_addr}/{release}?" + "&".join(f"{k}={v}" for k, v in options.items())


def cli_env(nacos: NacosServer, password: str | None = None) -> dict[str, str]:
    return {**os.environ, "GRAYAGENT_NACOS_PASSWORD": nacos.password if password is None else password}


def put(nacos: NacosServer, data_id: str, content: str, namespace: str = "") -> None:
    """What another tool does: a plain OpenAPI publish, no compare-and-set."""
    data = {"dataId": data_id, "group": GROUP, "content": content, **({"tenant": namespace} if namespace else {})}
    status, body, _ = nacos.request("POST", "/v1/cs/configs", data=data)
    assert (status, body) == (200, "true"), (status, body)


def read(nacos: NacosServer, data_id: str) -> str | None:
    status, body, _ = nacos.request("GET", "/v1/cs/configs", params={"dataId": data_id, "group": GROUP})
    return body if status == 200 else None


def doc_for(backends: dict[str, Backend], port: int, canary: float) -> bytes:
    servers = {n: [f"127.0.0.1:{b.port}"] for n, b in backends.items()}
    return dump(document(service(listen=f"127.0.0.1:{port}", servers=servers,
                                 split={"key": {"header": "X-User-Id"},
                                        "weights": {"stable": 100 - canary, "canary": canary, "beta": 0}})))


def publish(store: NacosStore, content: bytes, message: str = "") -> int:
    current = store.current()
    return store.publish(content, current.version if current else 0, "test", message).version


def audit(state: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]


def applied_versions(state: Path) -> list[object]:
    return [e["version"] for e in audit(state) if e["event"] == "apply" and e["result"] == "ok"]


def assert_no_secrets(nacos: NacosServer, *texts: str) -> None:
    for text in texts:
        assert nacos.password not in text
        assert "eyJ" not in text, "an access token (a JWT) leaked"
        assert "accessToken" not in text


# ---------------------------------------------------------------------------------------------- no server needed

def test_url_forms_and_refused_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAYAGENT_NACOS_PASSWORD", raising=False)
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    config = parse_url(f"nacos://a:8848,b:8848/shop?namespace=prod&group=EDGE&user=ops&password_file={secret}")
    assert (config.endpoints, config.release, config.namespace, config.group) == (("a:8848", "b:8848"), "shop",
                                                                                  "prod", "EDGE")
    assert (config.user, config.password) == ("ops", "s3cret")
    assert config.redacted_url == "nacos://ops@a:8848,b:8848/shop?namespace=prod&group=EDGE"
    assert parse_url("nacos://a:8848/shop?namespace=public").namespace == ""
    assert parse_url("nacos://a:8848/shop").redacted_url == "nacos://a:8848/shop?group=GRAYAGENT"
    monkeypatch.setenv("GRAYAGENT_NACOS_PASSWORD", "from-env")
    assert parse_url("nacos://ops@a:8848/shop").password == "from-env"
    monkeypatch.delenv("GRAYAGENT_NACOS_PASSWORD")
    for bad, message in [
        ("nacos://ops:s3cret@a:8848/shop", "do not put the password in the URL"),
        ("nacos://a:8848/shop?user=ops&password=s3cret", "not password="),
        ("nacos://a:8848/shop?user=ops", "needs password_file= or $GRAYAGENT_NACOS_PASSWORD"),
        ("nacos://a:8848/", "name the release"),
        ("nacos://a/shop", "is not host:port"),
        ("nacos://a:8848/sh op", "use letters, digits"),
        ("nacos://a:8848/shop?grup=x", "unknown option 'grup'"),
    ]:
        with pytest.raises(UsageError, match=None) as caught:
            parse_url(bad)
        assert message in str(caught.value), (bad, caught.value)
        assert "s3cret" not in str(caught.value)
    done = grayagent("history", "--store", "nacos://ops:s3cret@127.0.0.1:1/shop")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "s3cret" not in done.stderr
    token = "eyJhbGciOiJIUzM4NCJ9.eyJzdWIiOiJuYWNvcyJ9.hPWDmoffKOeuMyZNnEWaJnPEx"
    assert redact(f"url:/v1/cs/configs?accessToken={token}&password=pw x") == \
        "url:/v1/cs/configs?accessToken=***&password=*** x"


def test_sdk_log_records_are_bridged_redacted_and_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    store = NacosStore("nacos://127.0.0.1:1/shop")  # no I/O until used
    sdk = logging.getLogger("nacos.client")
    sdk.info("[get_access_token] AccessToken: eyJhbGciOiJIUzM4NCJ9.eyJzdWIiOiJuYWNvcyJ9.hPWDmoffKOeuMyZN")
    sdk.debug("[do-sync-req] url:/nacos/v1/auth/login?username=nacos&password=hunter2")
    sdk.error("[get-config] exception All server are not available occur")  # raised to us: one line is enough
    sdk.warning("[unknown-path] something odd, token=eyJhbGciOiJIUzM4NCJ9.eyJzdWIiOiJuYWNvcyJ9.hPWDmoffKOeu")
    out = capsys.readouterr()
    logged = out.out + out.err
    assert "something odd" in logged and "token=***" in logged
    assert "eyJ" not in logged and "hunter2" not in logged and "All server" not in logged
    store.close()


# ---------------------------------------------------------------------------------------------- with a server

def test_cli_publish_history_show_diff_revert_and_conflict(tmp_path: Path, nacos: NacosServer) -> None:
    store_url = url(nacos, "cli")
    env = cli_env(nacos)
    first, second = tmp_path / "v1.json", tmp_path / "v2.json"
    first.write_bytes(dump(document(service(split={"weights": {"stable": 90, "canary": 10}}))))
    second.write_bytes(dump(document(service(split={"weights": {"stable": 50, "canary": 50}}))))
    runs = []

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = grayagent("--log-level", "debug", *args, "--store", store_url, env=env)
        runs.append(done)
        return done

    assert run("publish", str(first), "-m", "ten").stdout.strip() == "1"
    assert run("publish", str(second), "--expect-version", "1").stdout.strip() == "2"
    stale = run("publish", str(second), "--expect-version", "1")
    assert stale.returncode == 3
    assert stale.stderr.strip() == ("grayagent: conflict: expected current version 1, but the store is at 2; "
                                    "re-read and publish again")
    history = json.loads(run("history", "-o", "json").stdout)
    assert [(h["version"], h["parent"], h["message"]) for h in history] == [(1, 0, "ten"), (2, 1, "")]
    assert "+      \"stable\": 50," in run("diff", "1", "2").stdout
    assert run("revert", "1").stdout.strip() == "3"
    assert run("show").stdout == first.read_text()
    shown = json.loads(run("show", "2", "-o", "json").stdout)
    assert shown["version"] == 2 and shown["content"] == second.read_text()
    assert run("show", "9").returncode == 1
    # The layout is plain dataIds that other tools can read.
    assert read(nacos, "cli.current") == "3"
    entry = json.loads(read(nacos, "cli.v3") or "{}")
    assert (entry["version"], entry["parent"], entry["content"]) == (3, 2, first.read_text())
    # The chain: intact, until another tool rewrites version 2 with a recomputed digest (issue 12.10).
    assert run("history", "--verify").returncode == 0
    forged = json.loads(read(nacos, "cli.v2") or "{}")
    forged["content"] = first.read_text()
    forged["digest"] = digest_of(forged["content"].encode())
    put(nacos, "cli.v2", json.dumps(forged))
    wait_until(lambda: run("history", "--verify").returncode == 1, 20, "the forged version to be read back")
    assert runs[-1].stdout.startswith("version 3: parent_digest does not match version 2")
    assert run("revert", "2").returncode == 1 and read(nacos, "cli.current") == "3"
    assert_no_secrets(nacos, *(r.stdout + r.stderr for r in runs))


def test_concurrent_publishers_exactly_one_wins_per_parent(nacos: NacosServer, password_file: Path) -> None:
    stores = [NacosStore(url(nacos, "race", password_file)) for _ in range(6)]
    try:
        for parent in range(4):  # parent 0 races on the very first publish, when the pointer does not exist
            results: list[object] = []
            barrier = threading.Barrier(len(stores))

            def race(store: NacosStore, i: int, expected: int = parent, start: threading.Barrier = barrier,
                     out: list[object] = results) -> None:
                start.wait()
                try:
                    out.append(store.publish(dump(document(name=f"racer{i}")), expected, f"racer{i}", "").version)
                except Conflict as exc:
                    out.append(exc)

            threads = [threading.Thread(target=race, args=(s, i)) for i, s in enumerate(stores)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            wins = [r for r in results if isinstance(r, int)]
            assert wins == [parent + 1], results
            assert all(isinstance(r, Conflict) and r.actual == parent + 1 for r in results if r not in wins)
            winner = stores[0].current()
            assert winner is not None and winner.version == parent + 1
            assert json.loads(winner.content)["metadata"]["name"] == winner.meta.author
        assert [(m.version, m.parent) for m in stores[0].history()] == [(1, 0), (2, 1), (3, 2), (4, 3)]
    finally:
        for s in stores:
            s.close()


def test_version_entries_are_written_once(nacos: NacosServer, password_file: Path) -> None:
    store = NacosStore(url(nacos, "once", password_file))
    try:
        # Another tool created the pointer as "0" and left a stray entry where version 2 would go.
        put(nacos, "once.current", "0")
        assert store.current() is None
        assert publish(store, dump(document()), "first") == 1
        stray = json.dumps({"version": 2, "parent": 1, "created": "2020-01-01T00:00:00.000000Z", "author": "gone",
                            "message": "abandoned", "digest": digest_of(b"x"), "content": "x", "publish_id": "old"})
        put(nacos, "once.v2", stray)
        assert publish(store, dump(document(name="next")), "second") == 3  # skips 2, never overwrites it
        assert read(nacos, "once.v2") == stray
        assert [(m.version, m.parent, m.message) for m in store.history()] == [(1, 0, "first"), (3, 1, "second")]
        with pytest.raises(Conflict) as caught:
            store.publish(dump(document()), 1, "late", "stale parent")
        assert (caught.value.expected, caught.value.actual) == (1, 3)
        assert read(nacos, "once.v4") is None  # a stale publisher writes no entry
    finally:
        store.close()


def test_watch_reports_changes_and_stops_promptly(nacos: NacosServer, password_file: Path) -> None:
    store = NacosStore(url(nacos, "watch", password_file))
    changed = threading.Event()
    states: list[bool] = []

    class Handler:
        def changed(self) -> None:
            changed.set()

        def store_state(self, reachable: bool, detail: str = "") -> None:
            states.append(reachable)

    stop = threading.Event()
    watcher = threading.Thread(target=store.watch, args=(Handler(), stop), daemon=True)
    watcher.start()
    try:
        assert changed.wait(10), "no initial resync"
        time.sleep(0.5)  # now parked in a long-poll
        for n in range(1, 4):
            changed.clear()
            started = time.monotonic()
            publish(store, dump(document()), f"v{n}")
            assert changed.wait(5), f"publish {n} was not reported"
            assert time.monotonic() - started < 2
        assert states == [True]
        time.sleep(0.5)
        started = time.monotonic()
        stop.set()
        watcher.join(5)
        assert not watcher.is_alive() and time.monotonic() - started < 1.5, "watch did not stop promptly"
    finally:
        stop.set()
        store.close()


def test_agent_follows_changes_and_reports_fleet_status(tmp_path: Path, nacos: NacosServer, password_file: Path,
                                                        nginx: NginxInstance, backends: dict[str, Backend]) -> None:
    port = free_port()
    store_url = url(nacos, "agent", password_file)
    store = NacosStore(store_url)
    publish(store, doc_for(backends, port, 0), "all stable")
    agent_store = NacosStore(store_url)
    with running_agent(agent_store, nginx, tmp_path / "state", min_apply_interval=0.1, host="gw-agent"):
        wait_live(nginx, 1)
        client = Client(port)
        assert client.get("/", {"X-User-Id": "u1"})[1] == "stable"
        started = time.monotonic()
        publish(store, doc_for(backends, port, 100), "all canary")
        wait_live(nginx, 2)
        assert time.monotonic() - started < 3
        assert client.get("/", {"X-User-Id": "u1"})[1] == "canary"
        done = grayagent("status", "--store", store_url, "--wait", "20", "-o", "json")
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert report["converged"] and report["current_version"] == 2
        assert [(a["host"], a["applied_version"], a["healthy"]) for a in report["agents"]] == [("gw-agent", 2, True)]
        assert grayagent("revert", "1", "--store", store_url).stdout.strip() == "3"
        wait_live(nginx, 3)
        assert client.get("/", {"X-User-Id": "u1"})[1] == "stable"
    agent_store.close()  # deregisters the instance at once
    wait_until(lambda: store.fleet() == [], 10, "the stopped agent to leave the fleet")
    assert applied_versions(tmp_path / "state") == [1, 2, 3]
    store.close()


def test_documents_written_by_other_tools_are_applied_or_refused(tmp_path: Path, nacos: NacosServer,
                                                                 password_file: Path, nginx: NginxInstance,
                                                                 backends: dict[str, Backend]) -> None:
    port = free_port()
    store_url = url(nacos, "other", password_file)
    store = NacosStore(store_url)
    publish(store, doc_for(backends, port, 0))
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: grayagent/v1\nkind: GrayRelease\nmetadata: {name: shop}\nspec:\n  services:\n"
                   "    - {name: product, listen: 8080, upstreams: {a: {servers: ['h:1']}}, default: b}\n")
    done = grayagent("publish", str(bad), "--store", store_url)
    assert done.returncode == 1 and done.stderr.strip() == f"{bad}: spec.services[0].default: unknown upstream 'b'"
    with running_agent(store, nginx, tmp_path / "state", min_apply_interval=0.05) as agent:
        wait_live(nginx, 1)
        # Another tool writes a bare YAML document and moves the pointer with plain OpenAPI calls.
        yaml_doc = (f"apiVersion: grayagent/v1\nkind: GrayRelease\nmetadata: {{name: shop}}\nspec:\n  services:\n"
                    f"  - name: product\n    listen: '127.0.0.1:{port}'\n    upstreams:\n"
                    f"      canary: {{servers: ['127.0.0.1:{backends['canary'].port}']}}\n    default: canary\n")
        put(nacos, "other.v2", yaml_doc)
        put(nacos, "other.current", "2")
        wait_live(nginx, 2)
        assert Client(port).get("/", {"X-User-Id": "u"})[1] == "canary"
        put(nacos, "other.v3", bad.read_text())
        put(nacos, "other.current", "3")
        wait_until(lambda: agent.status.last_error is not None, 10, "version 3 to be refused")
        assert "unknown upstream 'b'" in (agent.status.last_error or "")
        assert not agent.status.healthy and agent.status.applied_version == 2
        time.sleep(1)
        assert Client(port).get("/", {"X-User-Id": "u"})[1] == "canary"
    refusals = [e for e in audit(tmp_path / "state") if e["event"] == "refuse"]
    assert [r["version"] for r in refusals] == [3], "refused once, never retried"
    assert [m.version for m in store.history()] == [1, 2, 3]
    store.close()


def test_namespaces_keep_releases_apart(nacos: NacosServer, password_file: Path) -> None:
    nacos.create_namespace("team-a")
    team = NacosStore(url(nacos, "ns", password_file, namespace="team-a"))
    public = NacosStore(url(nacos, "ns", password_file))
    try:
        assert publish(team, dump(document(name="team")), "team a") == 1
        assert public.current() is None and public.history() == []
        assert publish(public, dump(document(name="public")), "public") == 1
        assert json.loads(team.get(1).content)["metadata"]["name"] == "team"
        assert json.loads(public.get(1).content)["metadata"]["name"] == "public"
        team.report("gw-team", {"applied_version": 1, "healthy": True})
        wait_until(lambda: [a["host"] for a in team.fleet()] == ["gw-team"], 10, "the team agent to show up")
        assert public.fleet() == []
        shown = grayagent("show", "--store", url(nacos, "ns", namespace="team-a"), env=cli_env(nacos))
        assert json.loads(shown.stdout)["metadata"]["name"] == "team"
    finally:
        team.close()
        public.close()


def test_history_on_a_nacos3_without_the_v1_admin_api(tmp_path: Path, nacos: NacosServer) -> None:
    """Nacos 3 ships with the v1 admin API off; history falls back to the v3 admin listing."""
    off = {"nacos.core.api.compatibility.admin.enabled": "false",
           "nacos.core.api.compatibility.console.enabled": "false", "server.shutdown": "immediate"}
    with NacosServer(tmp_path / "nacos3", extra_properties=off) as server:
        secret = tmp_path / "pw"
        secret.write_text(server.password)
        store = NacosStore(url(server, "v3", secret))
        try:
            first = dump(document(name="first"))
            assert publish(store, first, "one") == 1
            assert publish(store, dump(document(name="second")), "two") == 2
            assert store.publish(store.get(1).content, 2, "test", "revert").version == 3
            assert [(m.version, m.parent, m.message) for m in store.history()] == [
                (1, 0, "one"), (2, 1, "two"), (3, 2, "revert")]
            assert store.get(3).content == first
        finally:
            store.close()


def test_wrong_password_is_one_clear_line(tmp_path: Path, nacos: NacosServer, nginx: NginxInstance) -> None:
    wrong = "not-the-password-42"
    doc = tmp_path / "doc.json"
    doc.write_bytes(dump(document()))
    done = grayagent("--log-level", "debug", "publish", str(doc), "--store", url(nacos, "auth"),
                     env=cli_env(nacos, wrong))
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        f"grayagent: nacos://nacos@{nacos.server_addr}/auth?group=GRAYAGENT: login as 'nacos' refused (HTTP 500): "
        "wrong user or password"]
    assert wrong not in done.stdout + done.stderr
    agent = grayagent("--log-level", "debug", "agent", "--once", "--store", url(nacos, "auth"),
                      "--nginx-conf", str(nginx.conf), "--nginx-main-conf", str(nginx.main_conf),
                      "--nginx-bin", nginx.binary, "--verify-listen", nginx.verify_listen,
                      "--state-dir", str(tmp_path / "state"), env=cli_env(nacos, wrong))
    assert agent.returncode == 1
    assert "refused (HTTP 500): wrong user or password" in agent.stderr
    assert wrong not in agent.stdout + agent.stderr
    with pytest.raises(StoreError, match="wrong user or password"):
        bad_file = tmp_path / "bad-pw"
        bad_file.write_text(wrong)
        NacosStore(url(nacos, "auth", bad_file)).current()


def test_nacos_restart_while_an_agent_runs(tmp_path: Path, nacos: NacosServer, nginx: NginxInstance,
                                           backends: dict[str, Backend], monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs last: the server goes away. The agent keeps serving, resyncs after the restart, misses nothing."""
    port = free_port()
    store_url = url(nacos, "restart")
    env = cli_env(nacos)
    monkeypatch.setenv("GRAYAGENT_NACOS_PASSWORD", nacos.password)  # this process's store, too
    store = NacosStore(store_url)
    publish(store, doc_for(backends, port, 0))
    state = tmp_path / "state"
    log_path = tmp_path / "agent.log"
    with log_path.open("w") as log:
        agent = subprocess.Popen([sys.executable, "-m", "grayagent.cli", "--log-level", "debug", "agent",
                                  "--store", store_url, "--nginx-conf", str(nginx.conf),
                                  "--nginx-main-conf", str(nginx.main_conf), "--nginx-bin", nginx.binary,
                                  "--verify-listen", nginx.verify_listen, "--state-dir", str(state),
                                  "--min-apply-interval", "0.1"], stdout=log, stderr=subprocess.STDOUT,
                                 env=env)
    try:
        wait_live(nginx, 1)

        def status() -> dict[str, object]:
            return dict(json.loads((state / "status.json").read_text()))

        nacos.stop()
        wait_until(lambda: status()["store_reachable"] is False, 20, "the agent to notice Nacos is gone")
        assert Client(port).get("/", {"X-User-Id": "u"})[1] == "stable"  # last-good still served
        nacos.start()
        # Published at once, most likely while the agent's watch still backs off (it reaches seconds): the
        # full re-read after it reconnects must find it.
        assert publish(store, doc_for(backends, port, 100)) == 2
        wait_live(nginx, 2, timeout=30)
        wait_until(lambda: status()["store_reachable"] is True, 15, "the agent to report the store reachable")
        assert publish(store, doc_for(backends, port, 50)) == 3
        wait_live(nginx, 3)
        done = grayagent("status", "--store", store_url, "--wait", "30", "-o", "json", env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert [a["applied_version"] for a in json.loads(done.stdout)["agents"]] == [3]
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(20) == 0
    assert applied_versions(state) == [1, 2, 3]
    logged = log_path.read_text()
    assert "store unreachable" in logged or "store read failed" in logged  # whichever noticed first
    assert_no_secrets(nacos, logged)
    store.close()
