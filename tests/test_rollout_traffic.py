"""Per-upstream figures from a real nginx: the rendered JSON access log, tailed by the agent, on /metrics and
in the fleet status entry; and the tailer across rotation and truncation."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from grayagent.runtime.observe import AgentMetrics
from grayagent.stores.file import FileStore
from grayagent.targets.nginx import NginxSettings, NginxTarget
from grayagent.targets.nginx_access_log import AccessLogTailer, parse_line
from grayagent.targets.traffic import TrafficCollector
from tests.agenthelp import Client, running_agent_for, wait_live
from tests.docs import document, service
from tests.servers.proc import free_port, wait_until
from tests.test_nginx_agent import publish


def logging_target(nginx, log: Path) -> NginxTarget:
    return NginxTarget(NginxSettings(conf=nginx.conf, main_conf=nginx.main_conf, binary=nginx.binary,
                                     verify_listen=nginx.verify_listen, access_log=log))


def test_agent_counts_requests_5xx_and_latency_per_upstream(tmp_path: Path, nginx, backends) -> None:
    port = free_port()
    store = FileStore(str(tmp_path / "store"))
    servers = {n: [f"127.0.0.1:{backends[n].port}"] for n in ("stable", "canary")}
    publish(store, document(service(listen=f"127.0.0.1:{port}", servers=servers,
                                    split={"weights": {"stable": 50, "canary": 50}})))
    backends["canary"].fail(0.5)
    target = logging_target(nginx, tmp_path / "access.json")
    with running_agent_for(store, target, tmp_path / "state", status_interval=0.2) as agent:
        wait_live(nginx, 1)
        client = Client(port)
        statuses = [client.get("/")[0] for _ in range(400)]
        canary_calls = backends["canary"].count

        def counted() -> dict:
            fleet = store.fleet()
            return fleet[0].get("traffic", {}).get("upstreams", {}) if fleet else {}

        wait_until(lambda: sum(u["requests"] for u in counted().values()) == 400, 10, "400 requests counted")
        ups = counted()
        assert ups["product/canary"]["requests"] == canary_calls
        assert ups["product/canary"]["errors_5xx"] == statuses.count(503) == canary_calls // 2
        assert ups["product/stable"]["errors_5xx"] == 0
        assert ups["product/stable"]["latency_buckets"][-1] == ups["product/stable"]["requests"]
        text = agent.metrics.exposition().decode()
        assert f'grayagent_upstream_requests_total{{service="product",target="nginx",upstream="canary"}} ' \
               f'{float(canary_calls)}' in text
        assert 'grayagent_upstream_latency_seconds_bucket{le="+Inf",service="product"' in text


def test_tailer_survives_rotation_and_truncation(tmp_path: Path) -> None:
    log = tmp_path / "access.json"
    log.write_text('{"u":"grayagent.old.stable","st":"200","rt":"0.1","urt":"0.1"}\n')  # before start: skipped
    tailer = AccessLogTailer(log, poll=0.02).start()
    try:
        def line(up: str, status: int, urt: str = "0.004") -> str:
            return json.dumps({"u": f"grayagent.product.{up}", "st": str(status), "rt": "0.005", "urt": urt}) + "\n"

        def requests(up: str) -> int:
            return tailer.snapshot().as_dict()["upstreams"].get(f"product/{up}", {}).get("requests", 0)

        time.sleep(0.1)
        with log.open("a") as f:
            f.write(line("canary", 200) + line("canary", 503))
            f.write(line("canary", 200)[:10])  # half a line: counted once it is complete
            f.flush()
            wait_until(lambda: requests("canary") == 2, 5, "two lines")
            f.write(line("canary", 200)[10:])
        wait_until(lambda: requests("canary") == 3, 5, "the completed line")
        os.rename(log, tmp_path / "access.json.1")  # logrotate: rename, then the gateway reopens
        log.write_text(line("stable", 200) * 5)
        wait_until(lambda: requests("stable") == 5, 5, "lines in the new file")
        log.write_text("")  # copytruncate
        with log.open("a") as f:
            f.write(line("stable", 502, "-") + "not json\n" + '{"u":"backend_x","st":"200"}\n')
        wait_until(lambda: requests("stable") == 6, 5, "lines after truncation")
        snap = tailer.snapshot().as_dict()["upstreams"]
        assert snap["product/canary"]["errors_5xx"] == 1 and snap["product/stable"]["errors_5xx"] == 1
        assert "old/stable" not in json.dumps(snap)
    finally:
        tailer.stop()


def test_parse_line_and_collector() -> None:
    assert parse_line(b'{"u":"grayagent.a.b","st":"503","rt":"0.5","urt":"0.1, 0.2 : 0.05"}') == \
        ("a", "b", 503, 0.35000000000000003)
    assert parse_line(b'{"u":"grayagent.a.b","st":"502","rt":"0.5","urt":"-"}') == ("a", "b", 502, 0.5)
    assert parse_line(b'{"u":"other","st":"200"}') is None
    assert parse_line(b"garbage") is None
    tailer = AccessLogTailer(Path("/nonexistent"))
    tailer.counters.observe("a", "b", 200, 0.003)
    metrics = AgentMetrics("nginx")
    metrics.registry.register(TrafficCollector(tailer.counters, "nginx"))
    text = metrics.exposition().decode()
    assert 'grayagent_upstream_latency_seconds_bucket{le="0.005",service="a",target="nginx",upstream="b"} 1.0' in text


def test_envoy_agent_reports_per_cluster_figures(tmp_path: Path, backends) -> None:
    from tests.agenthelp import running_agent_for
    from tests.envoyhelp import envoy_instance, envoy_target, wait_target_live

    instances = envoy_instance(tmp_path)
    envoy = next(instances)
    try:
        port = free_port()
        store = FileStore(str(tmp_path / "store"))
        servers = {n: [f"127.0.0.1:{backends[n].port}"] for n in ("stable", "canary")}
        publish(store, document(service(listen=f"127.0.0.1:{port}", servers=servers,
                                        split={"weights": {"stable": 50, "canary": 50}})))
        backends["canary"].fail(0.5)
        target = envoy_target(envoy, traffic_stats=True)
        with running_agent_for(store, target, tmp_path / "state", status_interval=0.2) as agent:
            wait_target_live(target, 1)
            client = Client(port)
            statuses = [client.get("/")[0] for _ in range(200)]

            def counted() -> dict:
                fleet = store.fleet()
                return fleet[0].get("traffic", {}).get("upstreams", {}) if fleet else {}

            wait_until(lambda: sum(u["requests"] for u in counted().values()) == 200, 10, "200 requests counted")
            ups = counted()
            assert ups["product/canary"]["requests"] == backends["canary"].count
            assert ups["product/canary"]["errors_5xx"] == statuses.count(503) > 0
            assert ups["product/stable"]["errors_5xx"] == 0
            assert 'grayagent_upstream_5xx_total{service="product",target="envoy",upstream="canary"}' in \
                agent.metrics.exposition().decode()
    finally:
        next(instances, None)


def test_envoy_totals_parsing() -> None:
    from grayagent.targets.envoy_stats import ENVOY_BUCKETS_MS, envoy_totals
    from grayagent.targets.traffic import TrafficCounters

    buckets = [{"upper_bound": b, "interval": 0, "cumulative": 10 if b >= 5 else 0} for b in ENVOY_BUCKETS_MS]
    body = {"stats": [{"name": "cluster.grayagent.product.canary.upstream_rq_total", "value": 12},
                      {"name": "cluster.grayagent.product.canary.upstream_rq_5xx", "value": 3},
                      {"name": "cluster.grayagent.product.canary.external.upstream_rq_5xx", "value": 3},
                      {"name": "cluster.other.upstream_rq_total", "value": 99},
                      {"histograms": [{"name": "cluster.grayagent.product.canary.upstream_rq_time",
                                       "buckets": buckets}]}]}
    totals = envoy_totals(body)
    assert list(totals) == [("product", "canary")]
    canary = totals[("product", "canary")]
    assert (canary.requests, canary.errors_5xx) == (12, 3) and canary.cumulative()[1:4] == [0, 10, 10]
    counters = TrafficCounters()
    counters.replace(totals)
    boot = counters.boot
    counters.replace(envoy_totals({"stats": [{"name": "cluster.grayagent.product.canary.upstream_rq_total",
                                               "value": 2}]}))
    assert counters.boot != boot  # counters went down: Envoy restarted
