"""Rollouts on the etcd store: records with compare-and-set, leadership on a lease, and two controllers of which
exactly one acts, the other taking over when the leader goes away."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from grayagent.rollout import usecases as rollout
from grayagent.rollout.controller import Controller
from grayagent.stores.base import RecordConflict
from grayagent.stores.etcd import LEADER_LEASE_TTL, EtcdStore
from tests.docs import document, dump, service
from tests.servers.etcd import EtcdCluster
from tests.servers.proc import wait_until

PREFIX = "/grayagent/shop"


@pytest.fixture
def etcd1(tmp_path: Path) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path / "etcd", size=1) as cluster:
        yield cluster


def url(cluster: EtcdCluster) -> str:
    return f"etcd://{cluster.endpoints[0]}{PREFIX}"


def test_records_and_lease_leadership(etcd1: EtcdCluster) -> None:
    a, b = EtcdStore(url(etcd1)), EtcdStore(url(etcd1))
    try:
        assert a.read_record("product") == (None, 0)
        rev = a.write_record("product", {"n": 1}, 0)
        with pytest.raises(RecordConflict):
            b.write_record("product", {"n": 2}, 0)
        assert b.read_record("product") == ({"n": 1}, rev)
        rev2 = b.write_record("product", {"n": 2}, rev)
        with pytest.raises(RecordConflict):
            a.write_record("product", {"n": 3}, rev)
        assert a.read_record("product") == ({"n": 2}, rev2)

        lead = a.acquire_leadership("a")
        assert lead is not None and lead.held()
        assert b.acquire_leadership("b") is None
        assert a.record_names() == ["product"]  # the leader key is not a rollout
        time.sleep(LEADER_LEASE_TTL + 1)  # kept alive past its TTL
        assert lead.held() and b.acquire_leadership("b") is None
        lead.release()
        assert not lead.held()
        other = b.acquire_leadership("b")
        assert other is not None
        other.release()
    finally:
        a.close()
        b.close()


def test_a_leader_that_cannot_reach_etcd_stops_acting_before_its_lease_expires(etcd1: EtcdCluster) -> None:
    store = EtcdStore(url(etcd1))
    lead = store.acquire_leadership("a")
    assert lead is not None
    etcd1.kill_member(0)
    started = time.monotonic()
    wait_until(lambda: not lead.held(), LEADER_LEASE_TTL, "the leader to notice")
    assert time.monotonic() - started <= LEADER_LEASE_TTL / 2 + 0.5  # well before etcd could expire the lease
    etcd1.start_member(0)
    store.close()


def test_two_controllers_on_etcd_one_acts_then_the_other_takes_over(etcd1: EtcdCluster) -> None:
    spec = {"canary": "canary", "steps": [{"weight": 10}, {"pause": "1s"}, {"weight": 20}, {"pause": "1s"},
                                          {"weight": 30}, {"pause": "1s"}, {"weight": 100}]}
    publisher = EtcdStore(url(etcd1))
    publisher.publish(dump(document(service(split={"weights": {"stable": 100, "canary": 0}}, rollout=spec))),
                      0, "test", "")
    rollout.start(publisher, "product")
    stops = [threading.Event(), threading.Event()]
    controllers = [Controller(EtcdStore(url(etcd1)), interval=0.1, holder=f"c{i}") for i in range(2)]
    threads = [threading.Thread(target=c.run, args=(s,), daemon=True) for c, s in zip(controllers, stops, strict=True)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: publisher.read_record("product")[0]["weight"] == 1000, 10, "step 1")
        assert sum(c.ticks > 0 for c in controllers) == 1
        leader = 0 if controllers[0].ticks else 1
        stops[leader].set()  # stopping revokes the lease: the other controller takes over at once
        threads[leader].join(10)
        wait_until(lambda: publisher.read_record("product")[0]["phase"] == "succeeded", 20, "the takeover")
        assert controllers[1 - leader].ticks > 0
    finally:
        for s in stops:
            s.set()
        for t in threads:
            t.join(10)
        for c in controllers:
            c.store.close()
    messages = [m.message for m in publisher.history() if m.author == "rollout-controller"]
    assert messages == [f"rollout product: step {i}/7 weight {w}%" for i, w in ((1, 10), (3, 20), (5, 30), (7, 100))]
    publisher.close()
