"""A rollout's Prometheus URL must not turn the controller into a way to reach cloud metadata: link-local
hosts are refused (statically, and after resolving), redirects are not followed, and `rollout run
--metrics-host` limits the hosts to an allow-list."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from grayagent.errors import StoreError, UsageError
from grayagent.rollout import usecases as rollout
from grayagent.rollout.controller import Controller
from grayagent.rollout.sources import PrometheusSource, check_metrics_host, parse_metrics_hosts
from grayagent.rules.model import PrometheusQueries
from grayagent.stores.file import FileStore
from tests.agenthelp import grayagent
from tests.test_rollout_units import Clock, Scripted, doc


def spec(url: str) -> dict[str, Any]:
    return {"canary": "canary", "steps": [{"weight": 10}, {"weight": 100}],
            "analysis": {"interval": "10s", "maxErrorRate": 0.05, "prometheus": {"url": url, "errorRateQuery": "e"}}}


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest", "http://[fe80::1]:9090",
                                 "http://[fe80::1%25eth0]:9090", "http://[::ffff:169.254.169.254]/"])
def test_validate_refuses_a_link_local_prometheus_url(tmp_path: Path, url: str) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(doc(spec(url)))
    done = grayagent("validate", str(path))
    assert done.returncode == 1, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: spec.services[0].rollout.analysis.prometheus.url: ")
    assert "link-local" in lines[0]


def test_allow_list_entries_and_checks() -> None:
    allowed = parse_metrics_hosts(["prom.internal:9090", "Metrics", "[::1]:9090"])
    check_metrics_host("http://prom.internal:9090/", allowed)
    check_metrics_host("https://metrics/x", allowed)  # any port for an entry without one
    check_metrics_host("http://[::1]:9090", allowed)
    check_metrics_host("http://anything:1/", None)
    for url in ("http://prom.internal:9091/", "http://other:9090/", "http://[::1]:80/"):
        with pytest.raises(UsageError, match="not among the controller's allowed metric hosts"):
            check_metrics_host(url, allowed)
    with pytest.raises(UsageError, match="link-local"):
        check_metrics_host("http://169.254.169.254/", None)
    with pytest.raises(UsageError, match="--metrics-host: 'prom:99999'"):
        parse_metrics_hosts(["prom:99999"])


def test_rollout_run_refuses_a_bad_metrics_host_option(tmp_path: Path) -> None:
    done = grayagent("rollout", "run", "--store", str(tmp_path / "store"), "--metrics-host", "prom:x")
    assert done.returncode == 2 and "--metrics-host: 'prom:x' is not HOST or HOST:PORT" in done.stderr


def test_the_controller_stops_a_rollout_whose_metrics_host_is_not_allowed(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path / "store"))
    store.publish(doc(spec("http://evil.example:9090/")), 0, "test", "")
    ctl = Controller(store, interval=1, clock=Clock(), sources=lambda _: Scripted(),
                     metrics_hosts=parse_metrics_hosts(["prom.internal:9090"]))
    rollout.start(store, "product")
    ctl.tick()
    rec = store.read_record("product")[0]
    assert rec["phase"] == "aborted" and "evil.example:9090 is not among" in rec["reason"]
    assert len(store.history()) == 1  # nothing published


def test_a_name_that_resolves_to_link_local_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def metadata(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80))]
    monkeypatch.setattr(socket, "getaddrinfo", metadata)
    with pytest.raises(StoreError, match=r"resolves to the link-local address 169\.254\.169\.254"):
        PrometheusSource(PrometheusQueries("http://metadata.google.internal/", "e")).query("up")


class Redirect(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_redirect_is_not_followed() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        source = PrometheusSource(PrometheusQueries(f"http://127.0.0.1:{server.server_address[1]}/", "e"), timeout=2)
        with pytest.raises(StoreError, match="302"):
            source.query("up")
    finally:
        server.shutdown()
        server.server_close()
