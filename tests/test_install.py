"""Installs as an operator gets them: the wheel in bare venvs (one per extra, each against a real store), and
`make install` into a staged root whose units' command lines then run as the units' users."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from grayagent.stores.file import FileStore
from tests.agenthelp import wait_live
from tests.docs import document, dump, service
from tests.servers.etcd import EtcdCluster
from tests.servers.nginx import NginxInstance
from tests.servers.proc import wait_until

ROOT = Path(__file__).resolve().parent.parent
UNITS = ("grayagent-agent.service", "grayagent-rollout.service")
# `systemd-analyze security --offline=yes` exposure measured on 2026-12-02 (systemd 252); lower is better.
EXPOSURE_LIMIT = {"grayagent-agent.service": 2.2, "grayagent-rollout.service": 1.3}
ROLLOUT = {"canary": "canary", "steps": [{"weight": 10}, {"pause": "manual"}],
           "analysis": {"interval": "10s", "maxErrorRate": 0.05}}

pytestmark = pytest.mark.slow


def run(*argv: str | Path, env: dict[str, str] | None = None, timeout: float = 600,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{shlex.join(str(a) for a in argv)} exited {done.returncode}:\n"
                             f"{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One wheel for every install below, built the way `make dist` builds it."""
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", out, ROOT)
    (built,) = out.glob("grayagent-*.whl")
    return built


def bare_venv(where: Path, wheel: Path, extra: str) -> Path:
    """A fresh venv holding only the wheel and `extra`'s dependencies (from PyPI and pip's cache)."""
    run("python3", "-m", "venv", where)
    run(where / "bin" / "pip", "install", "--quiet", f"{wheel}[{extra}]" if extra else str(wheel))
    return where / "bin" / "grayagent"


def rules(path: Path) -> Path:
    path.write_bytes(dump(document(service())))
    return path


def test_the_base_wheel_serves_the_directory_store_and_ships_its_manual(wheel: Path, tmp_path: Path) -> None:
    grayagent = bare_venv(tmp_path / "venv", wheel, "")
    store = tmp_path / "store"
    store.mkdir()
    assert run(grayagent, "publish", rules(tmp_path / "r.json"), "--store", store).stdout.strip() == "1"
    assert "1" in run(grayagent, "history", "--store", store).stdout
    for topic, source in (("operations", "docs/operations.md"), ("readme", "README.md"),
                          ("agent-config", "deploy/agent.example.yaml")):
        assert run(grayagent, "docs", topic).stdout == (ROOT / source).read_text()
    # No gRPC stack without the extra, and the hint names the extra that brings it.
    missing = run(grayagent, "history", "--store", "etcd://127.0.0.1:1/grayagent/x", check=False)
    assert missing.returncode == 2 and "pip install 'grayagent[etcd]'" in missing.stderr


def test_the_etcd_extra_alone_runs_etcd_commands(wheel: Path, tmp_path: Path) -> None:
    grayagent = bare_venv(tmp_path / "venv", wheel, "etcd")
    with EtcdCluster(tmp_path / "etcd") as cluster:
        url = f"etcd://{cluster.endpoints[0]}/grayagent/shop"
        assert run(grayagent, "publish", rules(tmp_path / "r.json"), "--store", url, "-m", "first").stdout == "1\n"
        assert "first" in run(grayagent, "history", "--store", url).stdout


def test_the_nacos_extra_alone_runs_nacos_commands(wheel: Path, tmp_path: Path) -> None:
    from tests.servers.nacos import NacosServer, nacos_unavailable_reason

    reason = nacos_unavailable_reason()
    if reason is not None:
        pytest.skip(f"needs the Nacos server: {reason}")
    grayagent = bare_venv(tmp_path / "venv", wheel, "nacos")
    with NacosServer(tmp_path / "nacos", extra_properties={"server.shutdown": "immediate"}) as nacos:
        url = f"nacos://{nacos.server_addr}/shop?user={nacos.username}"
        env = {**os.environ, "GRAYAGENT_NACOS_PASSWORD": nacos.password}
        assert run(grayagent, "publish", rules(tmp_path / "r.json"), "--store", url, "-m", "first",
                   env=env).stdout == "1\n"
        assert "first" in run(grayagent, "history", "--store", url, env=env).stdout


# ---------------------------------------------------------------------------------------------- make install


def unit_settings(unit: Path) -> dict[str, list[str]]:
    """Each `Key=value` of a unit file, in order (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


class Staged:
    """A `make install DESTDIR=…` tree; `path()` maps an absolute path of the real layout into it."""

    def __init__(self, root: Path, user: str) -> None:
        self.root = root
        self.user = user

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def exec_start(self, unit: str) -> list[str]:
        """The unit's ExecStart with every absolute path moved into the staged tree."""
        argv = shlex.split(unit_settings(self.path(f"/usr/local/lib/systemd/system/{unit}"))["ExecStart"][0])
        return [str(self.path(a)) if a.startswith("/") else a for a in argv]


@pytest.fixture(scope="module")
def system_user() -> Iterator[str]:
    """A throwaway system user and group standing in for `grayagent` (the host's own is left alone)."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd")
    name = f"gatest{os.getpid() % 100000}"
    run("useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", name)
    try:
        yield name
    finally:
        run("userdel", name, check=False)
        run("groupdel", name, check=False)


@pytest.fixture(scope="module")
def staged(system_user: str, wheel: Path) -> Iterator[Staged]:
    if shutil.which("make") is None:
        pytest.skip("needs make")
    # Not under pytest's 0700 tmp dirs: the unit's user must reach the store inside.
    root = Path(tempfile.mkdtemp(prefix="grayagent-destdir-"))
    root.chmod(0o755)
    try:
        # WHEEL= reuses the session's wheel (it is newer than the sources, so make does not rebuild it).
        run("make", "-C", ROOT, "install", f"DESTDIR={root}", f"GRAYAGENT_USER={system_user}", f"WHEEL={wheel}")
        yield Staged(root, system_user)
    finally:
        shutil.rmtree(root)


def test_make_install_lays_out_the_documented_tree(staged: Staged, tmp_path: Path) -> None:
    command = staged.path("/usr/local/bin/grayagent")
    assert command.is_symlink() and command.resolve() == staged.path("/opt/grayagent/bin/grayagent")
    assert "Usage: grayagent" in run(command, "--help").stdout
    # Every runtime extra is in the venv.
    run(staged.path("/opt/grayagent/bin/python"), "-c", "import grayagent.stores.etcd, grayagent.stores.nacos")
    for unit in UNITS:
        assert staged.path(f"/usr/local/lib/systemd/system/{unit}").read_text() == (ROOT / "deploy" / unit).read_text()
        assert Path(staged.exec_start(unit)[0]) == command  # ExecStart names what make install created
    assert staged.path("/etc/grayagent/agent.yaml").read_text() == (ROOT / "deploy/agent.example.yaml").read_text()
    store = staged.path("/var/lib/grayagent/store")
    assert store.owner() == staged.user and store.group() == staged.user and store.stat().st_mode & 0o7777 == 0o2770
    assert staged.path("/var/lib/grayagent").group() == staged.user
    # The installed command works from any directory, even one holding another grayagent package.
    assert run(command, "publish", rules(tmp_path / "r.json"), "--store", store).stdout == "1\n"
    assert "1" in run(command, "history", "--store", store).stdout


def test_units_pass_systemd_analyze(staged: Staged, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze")
    for unit in UNITS:
        installed = staged.path(f"/usr/local/lib/systemd/system/{unit}")
        # verify checks that ExecStart is executable: point it at the staged command (the rest is unchanged).
        checked = tmp_path / unit
        checked.write_text(installed.read_text().replace("/usr/local/bin/grayagent",
                                                         str(staged.path("/usr/local/bin/grayagent"))))
        done = run("systemd-analyze", "verify", checked, check=False)
        assert done.returncode == 0 and not done.stderr.strip(), done.stderr
        out = run("systemd-analyze", "security", "--offline=yes", installed).stdout
        score = float(out.rsplit("Overall exposure level for", 1)[1].split(":", 1)[1].split()[0])
        assert score <= EXPOSURE_LIMIT[unit], out


def as_unit_user(staged: Staged, unit: str, argv: list[str]) -> list[str]:
    """`argv` as systemd would start it for `unit`: its User= and Group= (grayagent is the throwaway user),
    no supplementary groups, its capability bounding set, no new privileges."""
    settings = unit_settings(staged.path(f"/usr/local/lib/systemd/system/{unit}"))
    user, group = (settings[k][0].replace("grayagent", staged.user) for k in ("User", "Group"))
    caps = [c.removeprefix("CAP_").lower() for c in " ".join(settings["CapabilityBoundingSet"]).split()]
    return ["setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups", "--no-new-privs",
            "--bounding-set", ",".join(["-all", *(f"+{c}" for c in caps)]), "--", *argv]


def free_privileged_port() -> int:
    """A free loopback port below 1024: real gateways listen on 80 and 443, and `nginx -t` binds them too."""
    for port in range(1023, 899, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024")


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd="/")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_the_units_run_as_shipped_against_the_documented_store(staged: Staged, tmp_path: Path) -> None:
    """The operator publishes as root; the agent (root, group grayagent, two capabilities) applies it and
    reports into the store; the controller (user grayagent) reads that report and publishes the ramp."""
    store_dir = staged.path("/var/lib/grayagent/store")
    operator = os.environ | {"GRAYAGENT_STORE": str(store_dir)}
    nginx = NginxInstance(tmp_path / "nginx").start()
    try:
        doc = document(service(listen=f"127.0.0.1:{free_privileged_port()}",
                               split={"key": {"header": "X-User-Id"}, "weights": {"stable": 100, "canary": 0}},
                               rollout=ROLLOUT))
        (tmp_path / "r.json").write_bytes(dump(doc))
        version = int(run(staged.path("/usr/local/bin/grayagent"), "publish", tmp_path / "r.json",
                          env=operator).stdout)

        agent_env = os.environ | {"GRAYAGENT_STORE": str(store_dir), "GRAYAGENT_NGINX_CONF": str(nginx.conf),
                                  "GRAYAGENT_NGINX_MAIN_CONF": str(nginx.main_conf),
                                  "GRAYAGENT_NGINX_BIN": nginx.binary, "GRAYAGENT_VERIFY_LISTEN": nginx.verify_listen,
                                  "GRAYAGENT_STATUS_LISTEN": "127.0.0.1:0",
                                  "GRAYAGENT_STATE_DIR": str(staged.path("/var/lib/grayagent"))}
        agent = start(as_unit_user(staged, UNITS[0], staged.exec_start(UNITS[0])), agent_env, tmp_path / "agent.log")
        try:
            try:
                wait_live(nginx, version, timeout=30)
            except TimeoutError:
                raise AssertionError((tmp_path / "agent.log").read_text()) from None
            wait_until(lambda: any(p.exists() for p in (store_dir / "agents").glob("*.json")), 15, "a report")
            reports = list((store_dir / "agents").glob("*.json"))
            assert all(p.group() == staged.user and p.stat().st_mode & 0o040 for p in reports)

            # systemd's StateDirectory= makes the controller's state dir, owned by its user.
            state = staged.path("/var/lib/grayagent-rollout")
            state.mkdir(mode=0o750, exist_ok=True)
            shutil.chown(state, staged.user, staged.user)
            settings = unit_settings(staged.path(f"/usr/local/lib/systemd/system/{UNITS[1]}"))
            env_file = settings["EnvironmentFile"][0].lstrip("-")
            controller_env = {"PATH": os.environ["PATH"]}
            for line in [*settings["Environment"], *staged.path(env_file).read_text().splitlines()]:
                if line and not line.startswith("#"):
                    key, value = line.split("=", 1)
                    controller_env[key] = str(staged.path(value)) if value.startswith("/") else value
            # The installed agent sends no traffic figures (nginx_access_log is off), so the pre-flight's metrics
            # item fails: the start is forced.
            run(staged.path("/usr/local/bin/grayagent"), "rollout", "start", "product", "--force", "--reason",
                "install test: no traffic figures", env=operator)
            controller = start(as_unit_user(staged, UNITS[1], staged.exec_start(UNITS[1])), controller_env,
                               tmp_path / "controller.log")
            try:
                store = FileStore(str(store_dir))
                try:
                    wait_until(lambda: any(m.author == "rollout-controller" for m in store.history()), 30,
                               "the controller to publish its first step")
                except TimeoutError:
                    raise AssertionError((tmp_path / "controller.log").read_text()) from None
                wait_live(nginx, store.history()[-1].version, timeout=30)
                assert controller.poll() is None, (tmp_path / "controller.log").read_text()
            finally:
                stop(controller)
            assert controller.returncode == 0, (tmp_path / "controller.log").read_text()
            assert (state / "audit.jsonl").exists()
        finally:
            stop(agent)
        assert agent.returncode == 0, (tmp_path / "agent.log").read_text()
        log = (tmp_path / "agent.log").read_text() + (tmp_path / "controller.log").read_text()
        assert "Traceback" not in log and "PermissionError" not in log, log
    finally:
        nginx.stop()


def test_make_uninstall_keeps_config_state_and_store(staged: Staged) -> None:
    store = staged.path("/var/lib/grayagent/store")
    run("make", "-C", ROOT, "uninstall", f"DESTDIR={staged.root}")
    assert not staged.path("/usr/local/bin/grayagent").exists()
    assert not staged.path("/usr/local/bin/grayagent").is_symlink()
    assert not staged.path("/opt/grayagent").exists()
    assert not any(staged.path(f"/usr/local/lib/systemd/system/{u}").exists() for u in UNITS)
    assert staged.path("/etc/grayagent/agent.yaml").exists() and (store / "versions").is_dir()
