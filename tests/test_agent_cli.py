"""Clear answers from the CLI and the agent: every mistake gets one line naming what to fix, exit non-zero."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from grayagent.logsetup import Throttle, configure
from grayagent.stores.file import FileStore
from tests.agenthelp import grayagent
from tests.docs import document, dump, service
from tests.servers.etcd import EtcdCluster


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real small filesystem to fill up (needs root and mount(2); skipped where not permitted)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write until the filesystem is full; returns the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return filler


def test_publish_into_a_full_disk_is_one_line(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "store", "64k") as store_dir:
        FileStore(str(store_dir))
        fill(store_dir)
        doc = tmp_path / "doc.yaml"
        doc.write_bytes(dump(document(service())))
        done = grayagent("publish", str(doc), "--store", str(store_dir))
        assert done.returncode == 1, done
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("grayagent: ") and "No space left on device" in lines[0]
        assert str(store_dir) in lines[0], "the line names the file that could not be written"
        assert "Traceback" not in done.stderr


def test_config_file_mistakes_say_what_to_do(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("store: /s\nstate_dir: /x\nnginx_cnof: /typo.conf\nhost: yes\nnginx_mode: on\n")
    done = grayagent("agent", "--config", str(config))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"{config}: nginx_cnof: unknown key; did you mean nginx_conf?",
        f"{config}: host: YAML reads an unquoted yes, no, on, off, true or false as a boolean; quote the value if "
        "you mean the word",
        f"{config}: nginx_mode: YAML reads an unquoted yes, no, on, off, true or false as a boolean; quote the "
        "value if you mean the word",
    ]


def test_a_taken_status_port_names_its_config_key(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "agent.yaml"
        config.write_text(f"store: {tmp_path / 'store'}\nstate_dir: {tmp_path / 'state'}\n"
                          f"nginx_conf: {tmp_path / 'ga.conf'}\nstatus_listen: '127.0.0.1:{port}'\n")
        env = {k: v for k, v in os.environ.items() if k != "GRAYAGENT_STATUS_LISTEN"}
        done = grayagent("agent", "--config", str(config), env=env)
    assert done.returncode == 2, done
    assert done.stderr.splitlines() == [
        f"grayagent: status_listen 127.0.0.1:{port} (--status-listen, GRAYAGENT_STATUS_LISTEN or the config file): "
        "Address already in use"]


@pytest.mark.parametrize(("setting", "flag", "message"), [
    ("status_listen: '127.0.0.1:99999'", "--status-listen=127.0.0.1:99999",
     "status_listen (--status-listen, GRAYAGENT_STATUS_LISTEN or the config file): '127.0.0.1:99999' is not "
     "HOST:PORT with a port from 0 to 65535"),
    ("# the schema refuses it in the file; the flag has no schema", "--status-listen=localhost:\u00b2",
     "status_listen (--status-listen, GRAYAGENT_STATUS_LISTEN or the config file): 'localhost:\u00b2' is not "
     "HOST:PORT with a port from 0 to 65535"),
    ("min_apply_interval: .nan", "--min-apply-interval=nan",
     "min_apply_interval (--min-apply-interval, GRAYAGENT_MIN_APPLY_INTERVAL or the config file): nan is not a "
     "finite number of seconds"),
])
def test_out_of_range_ports_and_nan_intervals_are_one_line(tmp_path: Path, setting: str, flag: str,
                                                          message: str) -> None:
    """A port over 65535 or in superscript digits was an OverflowError/ValueError traceback from bind();
    NaN passes every range check of the flag types and the schema."""
    (tmp_path / "store").mkdir()
    config = tmp_path / "agent.yaml"
    config.write_text(f"store: {tmp_path / 'store'}\nstate_dir: {tmp_path / 'state'}\n"
                      f"nginx_conf: {tmp_path / 'ga.conf'}\n{setting}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAYAGENT_")}
    for argv in (["--config", str(config)], ["--config", str(config), "--once", flag]):
        if setting.startswith("#") and flag not in argv:
            continue
        done = grayagent("agent", *argv, env=env)
        assert done.returncode == 2 and done.stderr.splitlines() == [f"grayagent: {message}"], done.stderr


def test_an_empty_etcd_prefix_is_nothing_published_yet(tmp_path: Path) -> None:
    with EtcdCluster(tmp_path / "etcd", size=1) as cluster:
        url = f"etcd://{cluster.endpoints[0]}/grayagent/empty"
        once = grayagent("agent", "--once", "--store", url, "--state-dir", str(tmp_path / "state"),
                         "--nginx-conf", str(tmp_path / "ga.conf"))
        assert once.returncode == 1, once
        assert once.stdout == "empty: nothing published yet\n" and once.stderr == ""
        status = grayagent("status", "--store", url)
        assert status.returncode == 1
        assert status.stdout == "nothing published yet: 0 agents reporting, NOT converged\n", status
        assert "None" not in status.stdout + status.stderr


def test_library_log_lines_come_out_in_our_format(capsys: pytest.CaptureFixture[str]) -> None:
    """grpc, the Nacos SDK and watchdog log through the standard library: the same JSON lines as ours."""
    saved, root = structlog.get_config(), logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    configure("info", json_output=True)
    try:
        logging.getLogger("grpc._channel").warning("something from a library")
        logging.getLogger("watchdog.observers").info("chatter that must not appear")
        structlog.get_logger("grayagent.test").info("ours")
        lines = capsys.readouterr().err.splitlines()
    finally:  # the handlers hold capsys's stream, which closes with this test
        structlog.configure(**saved)
        root.handlers[:], root.level = saved_handlers, saved_level
    parsed = [json.loads(line) for line in lines]  # every line is JSON
    assert [p["event"] for p in parsed] == ["something from a library", "ours"]
    assert parsed[0]["level"] == "warning" and parsed[0]["logger"] == "grpc._channel"


def test_throttle_lets_one_line_a_minute_through() -> None:
    now = [0.0]
    seen: list[dict[str, object]] = []
    throttle = Throttle(every=60, clock=lambda: now[0])
    for _ in range(1000):
        throttle(lambda event, **kw: seen.append({"event": event, **kw}), "could not write status", error="ENOSPC")
        now[0] += 0.002
    now[0] = 61
    throttle(lambda event, **kw: seen.append({"event": event, **kw}), "could not write status", error="ENOSPC")
    assert seen == [{"event": "could not write status", "error": "ENOSPC"},
                    {"event": "could not write status", "error": "ENOSPC", "repeated": 999}]


@pytest.mark.parametrize("args", [["--list"], ["--unpin"], ["1"]])
def test_local_revert_names_a_mistyped_state_dir(tmp_path: Path, args: list[str]) -> None:
    missing = tmp_path / "stat"
    config = tmp_path / "agent.yaml"
    config.write_text(f"store: {tmp_path / 'store'}\nstate_dir: {missing}\nnginx_conf: {tmp_path / 'g.conf'}\n")
    done = grayagent("local-revert", *args, "--config", str(config))
    assert done.returncode == 2, done
    assert done.stderr.strip() == f"grayagent: --state-dir: {missing}: no such directory (the agent's state dir)"
    assert not missing.exists()
