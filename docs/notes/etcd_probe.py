"""Probe of the `pyetcd` client (etcd-sdk-python 0.0.7) against real etcd 3.5.1 (not a test).

Run from the repo root with the probe venv:

    PYTHONPATH=. /tmp/probe-venv/bin/python docs/notes/etcd_probe.py            # all sections
    PYTHONPATH=. /tmp/probe-venv/bin/python docs/notes/etcd_probe.py watch auth  # some sections

Findings are written up in docs/notes/etcd-probe.md.
"""
# ruff: noqa: B023  (the lambdas are called at once, inside the loop iteration)

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd import exceptions as pexc

from tests.servers.etcd import EtcdCluster

SECTIONS: dict[str, Callable[[], None]] = {}


def section(fn: Callable[[], None]) -> Callable[[], None]:
    SECTIONS[fn.__name__] = fn
    return fn


def describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{type(exc).__module__}.{type(exc).__name__}(code={exc.code().name}, details={exc.details()!r})"
    return f"{type(exc).__module__}.{type(exc).__name__}({exc!s})"


def attempt(fn: Callable[[], Any]) -> str:
    t0 = time.monotonic()
    try:
        val = fn()
        shown = " ".join(repr(val).split())
        return f"ok {shown:.80} [{time.monotonic() - t0:.3f}s]"
    except BaseException as exc:
        return f"RAISES {describe(exc)} [{time.monotonic() - t0:.3f}s]"


def log(*parts: object) -> None:
    print("  ", *parts, flush=True)


def cluster(**kw: Any) -> EtcdCluster:
    return EtcdCluster(Path(tempfile.mkdtemp(prefix="etcdprobe-")), **kw)


def hostport(ep: str) -> tuple[str, int]:
    host, port = ep.rsplit(":", 1)
    return host, int(port)


def client_for(c: EtcdCluster, i: int = 0, **kw: Any) -> pyetcd.Etcd3Client:
    host, port = hostport(c.endpoints[i])
    return pyetcd.client(host, port, **c.pyetcd_tls_kwargs(), **kw)


def robust_client(c: EtcdCluster, idxs: list[int] | None = None, timeout: float = 3, opts: Any = None,
                  **auth: Any) -> pyetcd.MultiEndpointEtcd3Client:
    """What we recommend: MultiEndpointEtcd3Client, endpoints never parked (time_retry=0), failover on."""
    creds = None
    if c.tls:
        kw = c.pyetcd_tls_kwargs()
        creds = pyetcd.MultiEndpointEtcd3Client.get_secure_creds(kw["ca_cert"], kw["cert_key"], kw["cert_cert"])
    eps = [pyetcd.Endpoint(*hostport(c.endpoints[i]), secure=c.tls, creds=creds, time_retry=0, opts=opts)
           for i in (idxs if idxs is not None else range(len(c.endpoints)))]
    return pyetcd.MultiEndpointEtcd3Client(endpoints=eps, timeout=timeout, failover=True, **auth)


def retry(fn: Callable[[], Any], limit: float = 10.0) -> str:
    """Call fn until it succeeds; report how long it took and which errors were seen."""
    t0 = time.monotonic()
    errs: dict[str, int] = {}
    while True:
        try:
            fn()
            return f"ok after {time.monotonic() - t0:.3f}s, errors before: {errs or 'none'}"
        except Exception as exc:
            key = type(exc).__name__
            errs[key] = errs.get(key, 0) + 1
            if time.monotonic() - t0 > limit:
                return f"STILL FAILING after {limit}s: {errs} last={describe(exc)}"
            time.sleep(0.02)


class Recorder:
    """A watch callback that keeps what it got, with arrival times."""

    def __init__(self) -> None:
        self.items: list[tuple[float, Any]] = []
        self.cond = threading.Condition()

    def __call__(self, resp: Any) -> None:
        with self.cond:
            self.items.append((time.monotonic(), resp))
            self.cond.notify_all()

    def wait(self, pred: Callable[[Any], bool], timeout: float) -> tuple[float, Any] | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, item in self.items:
                    if pred(item):
                        return t, item
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def summary(self) -> list[str]:
        out = []
        for _, r in self.items:
            if isinstance(r, pyetcd.watch.WatchResponse):
                out.append("WatchResponse(" + ",".join(f"{type(e).__name__}:{e.key.decode()}@{e.mod_revision}"
                                                       for e in r.events) + f"; hdr.rev={r.header.revision})")
            elif r is None:
                out.append("None")
            else:
                out.append(describe(r))
        return out


def is_event(r: Any) -> bool:
    return isinstance(r, pyetcd.watch.WatchResponse) and bool(r.events)


def is_error(r: Any) -> bool:
    return not isinstance(r, pyetcd.watch.WatchResponse)


# --------------------------------------------------------------------------- sections
@section
def startup() -> None:
    times = []
    for _ in range(5):
        c = cluster()
        t0 = time.monotonic()
        c.start()
        times.append(time.monotonic() - t0)
        c.stop(graceful=False)
    log("single member start (s):", " ".join(f"{t:.3f}" for t in times))
    c3 = cluster(size=3)
    t0 = time.monotonic()
    c3.start()
    log(f"3 members start: {time.monotonic() - t0:.3f}s")
    t0 = time.monotonic()
    leader = c3.leader_index()
    c3.kill_member(leader)
    new = c3.wait_for_leader(exclude=leader)
    log(f"leader {leader} SIGKILLed -> new leader {new} after {time.monotonic() - t0:.3f}s")
    c3.stop(graceful=False)
    ct = cluster(tls=True, auth=True)
    t0 = time.monotonic()
    ct.start()
    log(f"single member tls+auth start (8 etcdctl calls for auth): {time.monotonic() - t0:.3f}s")
    ct.stop(graceful=False)


@section
def failover() -> None:
    c = cluster(size=3).start()
    try:
        log("pyetcd.client(host, port, ...) takes ONE host. Multi: MultiEndpointEtcd3Client(endpoints=[Endpoint(...)])")
        cl = client_for(c, 0, timeout=2)
        log("put via member0:", attempt(lambda: cl.put("/grayagent/f", "1")))
        c.kill_member(0)
        log("member0 SIGKILLed; get:", attempt(lambda: cl.get("/grayagent/f")))
        log("get again (endpoint now marked failed):", attempt(lambda: cl.get("/grayagent/f")))
        c.start_member(0)
        log("member0 back; get:", attempt(lambda: cl.get("/grayagent/f")))
        ep = cl.endpoints[c.endpoints[0]]
        ep.last_failed = 0  # what a caller can do to clear the 300 s "failed" mark
        log("after endpoint.last_failed = 0; get:", attempt(lambda: cl.get("/grayagent/f")))

        # failover client
        eps = [pyetcd.Endpoint(*hostport(e), secure=False, time_retry=2.0) for e in c.endpoints]
        mc = pyetcd.MultiEndpointEtcd3Client(endpoints=eps, timeout=2, failover=True)
        log("failover client current endpoint:", mc._current_endpoint_label)
        idx = c.endpoints.index(mc._current_endpoint_label)
        log("put:", attempt(lambda: mc.put("/grayagent/f", "2")))
        c.kill_member(idx)
        log(f"member{idx} (current) SIGKILLed; get:", attempt(lambda: mc.get("/grayagent/f")))
        log("get again:", attempt(lambda: mc.get("/grayagent/f")),
            "now on member", c.endpoints.index(mc._current_endpoint_label))
        log("get again:", attempt(lambda: mc.get("/grayagent/f")),
            "now on member", c.endpoints.index(mc._current_endpoint_label))
        other = next(i for i in range(3) if i != idx and c.endpoints[i] == mc._current_endpoint_label)
        c.kill_member(other)
        log(f"member{other} also killed (no quorum); get:", attempt(lambda: mc.get("/grayagent/f")))
        log("get again:", attempt(lambda: mc.get("/grayagent/f")),
            "now on member", c.endpoints.index(mc._current_endpoint_label))
        log("serializable get:", attempt(lambda: mc.get("/grayagent/f", serializable=True)))
        log("put:", attempt(lambda: mc.put("/grayagent/f", "3")))
        log("get again:", attempt(lambda: mc.get("/grayagent/f")))
        c.start_member(idx, wait=False)
        c.start_member(other, wait=False)
        c.wait_for_leader()
        time.sleep(2.1)  # past time_retry
        log("all back, after time_retry; get:", attempt(lambda: mc.get("/grayagent/f")))

        # leader kill seen from a follower-connected client that never marks endpoints failed
        leader = c.leader_index()
        fol = (leader + 1) % 3
        fc = pyetcd.MultiEndpointEtcd3Client(
            endpoints=[pyetcd.Endpoint(*hostport(c.endpoints[fol]), secure=False, time_retry=0)], timeout=2)
        fc.put("/grayagent/f", "4")
        c.kill_member(leader)
        t0 = time.monotonic()
        results = []
        while time.monotonic() - t0 < 15:
            r = attempt(lambda: fc.put("/grayagent/f", "5"))
            results.append(r)
            if r.startswith("ok"):
                break
        log(f"leader killed, puts via follower member{fol} (Endpoint time_retry=0, timeout=2):",
            [r.split(" [")[0][:70] + " [" + r.split(" [")[1] for r in results][:3],
            f"... {len(results)} tries, ok after {time.monotonic() - t0:.3f}s")
        c.start_member(leader)
    finally:
        c.stop(graceful=False)


@section
def reconnect() -> None:
    """How long after a member comes back until a client bound to it works again."""
    fast = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000)]
    for label, opts in (("default grpc options", None), ("reconnect backoff 100ms..1s", fast)):
        c = cluster().start()
        try:
            host, port = hostport(c.endpoints[0])
            cl = pyetcd.MultiEndpointEtcd3Client(
                endpoints=[pyetcd.Endpoint(host, port, secure=False, time_retry=0, opts=opts)], timeout=2)
            cl.put("/grayagent/r", "1")
            for down in (1.0, 5.0):
                c.kill_member(0)
                t_end = time.monotonic() + down
                n_fail = 0
                while time.monotonic() < t_end:  # a caller polling while the member is down
                    with contextlib.suppress(pexc.Etcd3Exception):
                        cl.get("/grayagent/r")
                    n_fail += 1
                    time.sleep(0.1)
                c.start_member(0)
                t0 = time.monotonic()
                errs = set()
                while True:
                    try:
                        cl.get("/grayagent/r")
                        break
                    except Exception as exc:
                        errs.add(type(exc).__name__)
                        time.sleep(0.02)
                log(f"{label}: member down {down:.0f}s, healthy again -> client get ok after "
                    f"{time.monotonic() - t0:.3f}s (errors meanwhile: {sorted(errs)})")
        finally:
            c.stop(graceful=False)


@section
def txn() -> None:
    c = cluster().start()
    try:
        cl = client_for(c)
        t = cl.transactions
        cl.put("/grayagent/cur", "v1")
        val, meta = cl.get("/grayagent/cur")
        log("get ->", val, "mod_revision", meta.mod_revision, "version", meta.version,
            "header.revision", meta.response_header.revision)
        ok, resps = cl.transaction(
            compare=[t.mod("/grayagent/cur") == meta.mod_revision, t.value("/grayagent/cur") == "v1",
                     t.version("/grayagent/cur") == meta.version],
            success=[t.put("/grayagent/cur", "v2"), t.put("/grayagent/hist/2", "v2")],
            failure=[t.get("/grayagent/cur")])
        log("txn matching compare -> succeeded =", ok, "; responses:",
            [r.WhichOneof("response") if hasattr(r, "WhichOneof") else type(r).__name__ for r in resps])
        log("  response_put.header.revision of each put:", [r.response_put.header.revision for r in resps])
        ok2, resps2 = cl.transaction(
            compare=[t.mod("/grayagent/cur") == meta.mod_revision],
            success=[t.put("/grayagent/cur", "v3"), t.put("/grayagent/hist/3", "v3")],
            failure=[t.get("/grayagent/cur")])
        log("txn stale mod_revision -> succeeded =", ok2, "; failure branch got:",
            [(v, m.mod_revision) for v, m in resps2[0]])
        ok3, _ = cl.transaction(compare=[t.version("/grayagent/new") == 0],
                                success=[t.put("/grayagent/new", "x")], failure=[])
        ok4, _ = cl.transaction(compare=[t.version("/grayagent/new") == 0],
                                success=[t.put("/grayagent/new", "y")], failure=[])
        log("create-if-absent (version == 0): first", ok3, "second", ok4)
        # raw stub: gives the txn header revision
        req = etcdrpc.TxnRequest(
            compare=[etcdrpc.Compare(key=b"/grayagent/cur", target=etcdrpc.Compare.VALUE,
                                     result=etcdrpc.Compare.EQUAL, value=b"v2")],
            success=[etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=b"/grayagent/cur", value=b"v4"))])
        raw = cl.kvstub.Txn(req, 2, credentials=cl.call_credentials, metadata=cl.metadata)
        log("raw kvstub.Txn -> succeeded", raw.succeeded, "header.revision", raw.header.revision)
        log("put() returns PutResponse; header.revision =", cl.put("/grayagent/p", "1").header.revision)
    finally:
        c.stop(graceful=False)


@section
def header_revision() -> None:
    c = cluster().start()
    try:
        cl = client_for(c)
        cl.put("/grayagent/a", "1")
        cl.put("/other/x", "1")
        resp = cl.get_prefix_response("/grayagent/")
        log("get_prefix_response('/grayagent/').header.revision =", resp.header.revision,
            "kvs:", [(kv.key, kv.mod_revision) for kv in resp.kvs])
        log("get_prefix() yields (value, KVMetadata); meta.response_header.revision =",
            [m.response_header.revision for _, m in cl.get_prefix("/grayagent/")])
        log("empty prefix: list(get_prefix('/none/')) =", list(cl.get_prefix("/none/")),
            "but get_prefix_response('/none/').header.revision =", cl.get_prefix_response("/none/").header.revision)
        log("get(missing) ->", cl.get("/grayagent/missing"), "(no header: use get_response(key).header.revision =",
            cl.get_response("/grayagent/missing").header.revision, ")")
        # get-then-watch without gap
        snap = cl.get_prefix_response("/grayagent/")
        cl.put("/grayagent/b", "between")  # written after the snapshot, before the watch
        rec = Recorder()
        wid = cl.add_watch_prefix_callback("/grayagent/", rec, start_revision=snap.header.revision + 1)
        got = rec.wait(is_event, 3)
        log("watch from snapshot header.revision+1 sees the in-between put:", rec.summary() if got else "NOTHING")
        cl.cancel_watch(wid)
    finally:
        c.stop(graceful=False)


@section
def watch() -> None:
    for how in ("SIGKILL", "SIGTERM"):
        c = cluster().start()
        try:
            cl = client_for(c, timeout=3)  # plain pyetcd.client()
            rec = Recorder()
            cl.put("/grayagent/w", "0")
            wid = cl.add_watch_prefix_callback("/grayagent/", rec, start_revision=1)
            rec.wait(is_event, 3)
            log(f"[{how}] add_watch_prefix_callback(start_revision=1) -> id {wid}; got", rec.summary())
            t0 = time.monotonic()
            c.kill_member(0) if how == "SIGKILL" else c.stop_member(0)
            got = rec.wait(is_error, 10)
            log(f"[{how}] member stopped; callback called after "
                f"{(got[0] - t0) if got else float('nan'):.3f}s with:", rec.summary()[-1] if got else "NOTHING in 10 s")
            log(f"[{how}] add_watch_callback while down:", attempt(lambda: cl.add_watch_callback("/grayagent/w", rec)))
            log(f"[{how}] get while down:", attempt(lambda: cl.get("/grayagent/w")))
            c.start_member(0)
            log(f"[{how}] member healthy again; same pyetcd.client add_watch_callback:",
                attempt(lambda: cl.add_watch_callback("/grayagent/w", Recorder())))
            cl2 = client_for(c, timeout=3)
            log(f"[{how}] brand-new pyetcd.client add_watch_callback:",
                retry(lambda: cl2.add_watch_callback("/grayagent/w", Recorder())))
        finally:
            c.stop(graceful=False)

    # recommended client: time_retry=0, re-watch after the error
    c = cluster().start()
    try:
        cl = robust_client(c)
        rec = Recorder()
        cl.put("/grayagent/w", "0")
        cl.add_watch_prefix_callback("/grayagent/", rec)
        c.kill_member(0)
        rec.wait(is_error, 5)
        c.start_member(0)
        rec2 = Recorder()
        log("robust client (Endpoint time_retry=0): re-add watch after member healthy again:",
            retry(lambda: cl.add_watch_prefix_callback("/grayagent/", rec2)))
        cl.put("/grayagent/w", "1")
        log("  re-added watch delivers:", rec2.wait(is_event, 3) is not None)
    finally:
        c.stop(graceful=False)

    # the iterator API
    c = cluster().start()
    try:
        cl = client_for(c, timeout=3)
        it, _cancel = cl.watch_prefix("/grayagent/")
        out: list[str] = []

        def drain() -> None:
            try:
                for ev in it:
                    out.append(f"{type(ev).__name__}:{ev.key.decode()}")
                out.append("iterator ENDED normally")
            except BaseException as exc:
                out.append("iterator RAISED " + describe(exc))

        th = threading.Thread(target=drain, daemon=True)
        th.start()
        cl.put("/grayagent/i", "1")
        time.sleep(0.3)
        t0 = time.monotonic()
        c.kill_member(0)
        th.join(10)
        log(f"watch_prefix iterator, member SIGKILLed: {out} after {time.monotonic() - t0:.3f}s")
        c.start_member(0)
        log("  then get on same client:", attempt(lambda: cl.get("/grayagent/i")))
        rc = robust_client(c)
        retry(lambda: rc.get("/grayagent/i"))
        it2, cancel2 = rc.watch_prefix("/grayagent/")
        cancel2()
        log("  cancel() ends the iterator:", attempt(lambda: list(it2)))
    finally:
        c.stop(graceful=False)

    # in a 3-member cluster: kill the member the client is connected to, and a SIGSTOPped (hung) member
    c = cluster(size=3).start()
    try:
        cl = client_for(c, 1, timeout=3)
        rec = Recorder()
        cl.add_watch_prefix_callback("/grayagent/", rec)
        c.kill_member(1)
        got = rec.wait(is_error, 10)
        log("3 members, client's member SIGKILLed -> callback:", rec.summary()[-1] if got else "NOTHING")
        c.start_member(1)
        # hung member (SIGSTOP): no keepalive -> silence
        # grpcio 1.85: keepalive_timeout_ms alone still waits grpc.http2.ping_timeout_ms (default 60 s;
        # measured 64.7 s with only keepalive_time_ms=5000/keepalive_timeout_ms=2000).
        # etcd's server rejects pings more often than --grpc-keepalive-min-time (5 s) with GOAWAY.
        for opts in (None, [("grpc.keepalive_time_ms", 5000), ("grpc.keepalive_timeout_ms", 2000),
                            ("grpc.http2.ping_timeout_ms", 2000)]):
            cl = client_for(c, 2, timeout=3, grpc_options=opts)
            rec = Recorder()
            cl.add_watch_prefix_callback("/grayagent/", rec)
            time.sleep(0.2)
            proc = c.members[2].proc
            assert proc is not None
            t0 = time.monotonic()
            os.kill(proc.pid, signal.SIGSTOP)
            got = rec.wait(is_error, 12)
            log(f"SIGSTOPped member, grpc_options={opts}: callback after "
                f"{(got[0] - t0) if got else float('nan'):.1f}s:", rec.summary()[-1] if got else "NOTHING in 12 s")
            os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.5)
    finally:
        c.stop(graceful=False)


@section
def no_leader() -> None:
    """A client's member loses quorum: the watch is silent unless the stream carries hasleader=true."""
    for hasleader in (False, True):
        c = cluster(size=3).start()
        try:
            cl = robust_client(c, [0])
            if hasleader:
                cl.metadata = (("hasleader", "true"),)  # with auth: (("token", t), ("hasleader", "true"))
            rec = Recorder()
            cl.add_watch_prefix_callback("/grayagent/", rec)
            t0 = time.monotonic()
            c.kill_member(1)
            c.kill_member(2)
            got = rec.wait(is_error, 8)
            log(f"metadata hasleader={hasleader}: member0 lost quorum; watch callback",
                f"after {got[0] - t0:.2f}s: {rec.summary()[-1]}" if got else "NOTHING in 8 s",
                "; get:", attempt(lambda: cl.get("/grayagent/x")))
        finally:
            c.stop(graceful=False)


@section
def compaction() -> None:
    c = cluster().start()
    try:
        cl = client_for(c, timeout=3)
        for i in range(5):
            cl.put("/grayagent/c", str(i))
        rev = c.current_revision()
        cl.compact(rev - 1)
        log(f"compacted at {rev - 1} (current {rev})")
        log("get(key, revision=2) on compacted:", attempt(lambda: cl.get("/grayagent/c", revision=2)))
        rec = Recorder()
        r = attempt(lambda: cl.add_watch_prefix_callback("/grayagent/", rec, start_revision=2))
        got = rec.wait(lambda _: True, 3)
        log("add_watch_prefix_callback(start_revision=2):", r, "; callback got:", rec.summary() if got else "NOTHING")
        if got and isinstance(got[1], pexc.RevisionCompactedError):
            log("  RevisionCompactedError.compacted_revision =", got[1].compacted_revision)
        it, _cancel = cl.watch_prefix("/grayagent/", start_revision=2)
        log("watch_prefix(start_revision=2) iterator:", attempt(lambda: next(it)))
        try:
            it, _cancel = cl.watch_prefix("/grayagent/", start_revision=2)
            next(it)
        except pexc.RevisionCompactedError as exc:
            log("  exc.compacted_revision =", exc.compacted_revision)
        # raw protocol: first the created response, then one with compact_revision set and canceled=True
        reqs = iter([etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(key=b"/grayagent/c",
                                                                                     start_revision=2))])
        stream = etcdrpc.WatchStub(cl.channel).Watch(reqs, timeout=2)
        raw = []
        with contextlib.suppress(grpc.RpcError):
            for resp in stream:
                raw.append(f"created={resp.created} canceled={resp.canceled} compact_revision={resp.compact_revision}"
                           f" id={resp.watch_id}")
                if resp.canceled:
                    break
        log("raw WatchStub responses:", raw)
        log("watch from the compacted revision itself (start_revision=compact rev):",
            attempt(lambda: cl.watch_prefix_once("/grayagent/", timeout=1, start_revision=rev - 1)))
    finally:
        c.stop(graceful=False)


@section
def leases() -> None:
    c = cluster().start()
    try:
        cl = client_for(c, timeout=3)
        lease = cl.lease(2)
        log("lease(2) -> id", lease.id, "ttl", lease.ttl)
        cl.put("/grayagent/live/a", "x", lease=lease)
        time.sleep(1.2)
        log("remaining_ttl before refresh:", lease.remaining_ttl)
        r = lease.refresh()
        log("lease.refresh() ->", [(type(x).__name__, x.TTL) for x in r], "remaining_ttl:", lease.remaining_ttl)
        log("lease.keys:", lease.keys)
        rec = Recorder()
        cl.add_watch_prefix_callback("/grayagent/live/", rec)
        t0 = time.monotonic()
        got = rec.wait(is_event, 6)
        log(f"no more refresh: key deleted after {(got[0] - t0) if got else float('nan'):.2f}s, event:",
            rec.summary())
        log("get after expiry:", cl.get("/grayagent/live/a"))
        log("refresh expired lease:", attempt(lambda: [(x.ID, x.TTL) for x in lease.refresh()]), "(TTL 0, no exception)")
        log("put with expired lease:", attempt(lambda: cl.put("/grayagent/live/b", "x", lease=lease)))
        l2 = cl.lease(1)
        log("lease(1) granted TTL:", l2.ttl, "(etcd's minimum is ceil(1.5 x election timeout) = 1 s here)")
        log("revoke_lease:", attempt(lambda: l2.revoke()))
    finally:
        c.stop(graceful=False)


@section
def auth() -> None:
    c = cluster(tls=True, auth=True, auth_token_ttl=2).start()
    try:
        host, port = hostport(c.endpoints[0])
        tlskw = c.pyetcd_tls_kwargs()
        cl = pyetcd.client(host, port, user=c.user, password=c.password, timeout=3, **tlskw)
        log("TLS (ca_cert, cert_key, cert_cert) + user/password: put in prefix:",
            attempt(lambda: cl.put("/grayagent/a", "1")))
        log("put outside granted prefix:", attempt(lambda: cl.put("/other", "1")))
        log("wrong password at construction:",
            attempt(lambda: pyetcd.client(host, port, user=c.user, password="nope", timeout=3, **tlskw)))
        log("no credentials (auth on):", attempt(lambda: pyetcd.client(host, port, timeout=3, **tlskw).get("/grayagent/a")))
        log("ca_cert only, server demands client cert:",
            attempt(lambda: pyetcd.client(host, port, ca_cert=tlskw["ca_cert"], timeout=3).get("/grayagent/a")))
        log("plaintext to TLS port:", attempt(lambda: pyetcd.client(host, port, timeout=3).get("/grayagent/a")))
        # token TTL: idle vs busy
        busy = pyetcd.client(host, port, user=c.user, password=c.password, timeout=3, **tlskw)
        rec = Recorder()
        cl.add_watch_prefix_callback("/grayagent/", rec)
        busy_results = []
        for _ in range(8):
            busy_results.append(attempt(lambda: busy.get("/grayagent/a")).split(" [")[0][:60])
            time.sleep(0.5)
        log("client used every 0.5 s for 4 s (ttl=2):", sorted(set(busy_results)))
        log("idle client after 4 s (ttl=2): get:", attempt(lambda: cl.get("/grayagent/a")))
        log("  and again:", attempt(lambda: cl.get("/grayagent/a")))
        busy.put("/grayagent/a", "2")
        got = rec.wait(is_event, 3)
        log("  watch created before token expiry still delivers:", rec.summary()[-1] if got else "NOTHING")
        rec_new = Recorder()
        log("  new watch on the SAME (already open) watch stream with the expired token:",
            attempt(lambda: cl.add_watch_callback("/grayagent/a", rec_new)))
        busy.put("/grayagent/a", "3")
        log("    ...and it delivers:", rec_new.wait(is_event, 3) is not None)
        cl._stubs.pop("watcher", None)  # force a new Watch stream
        log("  new watch on a NEW watch stream with the expired token:",
            attempt(lambda: cl.add_watch_callback("/grayagent/a", Recorder())))
        # what the server actually answers (pyetcd ignores WatchResponse.canceled / cancel_reason)
        reqs = iter([etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(key=b"/grayagent/a"))])
        raw = []
        with contextlib.suppress(grpc.RpcError):
            for resp in etcdrpc.WatchStub(cl.channel).Watch(reqs, timeout=2, metadata=cl.metadata):
                raw.append(f"created={resp.created} canceled={resp.canceled} cancel_reason={resp.cancel_reason!r}")
                if resp.canceled:
                    break
        log("  raw WatchStub create with the expired token:", raw)
        # re-authentication by hand
        resp = cl.authstub.Authenticate(etcdrpc.AuthenticateRequest(name=c.user, password=c.password), 3)
        cl.metadata = (("token", resp.token),)
        cl.call_credentials = grpc.metadata_call_credentials(pyetcd.client.__globals__["EtcdTokenCallCredentials"](resp.token))
        cl._stubs.pop("watcher", None)
        log("after manual re-auth (new metadata + call_credentials, drop watcher): get:",
            attempt(lambda: cl.get("/grayagent/a")), "watch:", attempt(lambda: cl.add_watch_callback("/grayagent/a", Recorder())))
    finally:
        c.stop(graceful=False)

    # auth without TLS
    c = cluster(auth=True).start()
    try:
        host, port = hostport(c.endpoints[0])
        log("auth over plaintext:", attempt(lambda: pyetcd.client(host, port, user=c.user, password=c.password, timeout=3)
                                            .put("/grayagent/a", "1")))
        pc = pyetcd.client(host, port, user=c.user, password=c.password, timeout=3)
        pc.call_credentials = None  # the token still goes as plain metadata
        rec = Recorder()
        log("auth over plaintext with client.call_credentials = None: put",
            attempt(lambda: pc.put("/grayagent/a", "1")), "watch", attempt(lambda: pc.add_watch_prefix_callback("/grayagent/", rec)))
        pc.put("/grayagent/a", "2")
        log("  watch delivers:", rec.wait(is_event, 3) is not None)
    finally:
        c.stop(graceful=False)


@section
def timing() -> None:
    for kw, nocallcreds in (({}, False), ({"tls": True}, False), ({"tls": True, "auth": True}, False),
                            ({"tls": True, "auth": True}, True)):
        c = cluster(**kw).start()
        try:
            host, port = hostport(c.endpoints[0])
            creds = {"user": c.user, "password": c.password} if kw.get("auth") else {}
            cl = pyetcd.client(host, port, timeout=5, **c.pyetcd_tls_kwargs(), **creds)
            label = ("+".join(kw) or "plain") + (" call_credentials=None" if nocallcreds else "")
            if nocallcreds:
                cl.call_credentials = None  # token only as metadata
            cl.put("/grayagent/warm", "x")
            t0 = time.monotonic()
            for i in range(1000):
                cl.put(f"/grayagent/t/{i}", "v" * 100)
            log(f"1000 sequential puts {label}: {time.monotonic() - t0:.3f}s")
            t0 = time.monotonic()
            for i in range(1000):
                cl.get(f"/grayagent/t/{i}")
            log(f"1000 sequential gets {label}: {time.monotonic() - t0:.3f}s")
        finally:
            c.stop(graceful=False)

    c = cluster().start()
    try:
        host, port = hostport(c.endpoints[0])
        n = 500
        # one client, n watches (all on one gRPC stream)
        cl = pyetcd.client(host, port, timeout=5)
        seen = [threading.Event() for _ in range(n)]
        t0 = time.monotonic()
        for i in range(n):
            cl.add_watch_callback("/grayagent/hot", lambda r, i=i: is_event(r) and seen[i].set())
        log(f"{n} watches on one client: created in {time.monotonic() - t0:.3f}s, threads={threading.active_count()}")
        t0 = time.monotonic()
        cl.put("/grayagent/hot", "1")
        for e in seen:
            e.wait(10)
        log(f"  all {sum(e.is_set() for e in seen)} saw the put after {time.monotonic() - t0:.3f}s")
        # n clients, one watch each
        seen = [threading.Event() for _ in range(n)]
        clients = []
        t0 = time.monotonic()
        for i in range(n):
            ci = pyetcd.client(host, port, timeout=5)
            ci.add_watch_callback("/grayagent/hot2", lambda r, i=i: is_event(r) and seen[i].set())
            clients.append(ci)
        log(f"{n} clients x 1 watch: created in {time.monotonic() - t0:.3f}s, threads={threading.active_count()},"
            f" open fds={len(os.listdir('/proc/self/fd'))} (channels share one subchannel/TCP connection)")
        t0 = time.monotonic()
        cl.put("/grayagent/hot2", "1")
        for e in seen:
            e.wait(10)
        log(f"  all {sum(e.is_set() for e in seen)} saw the put after {time.monotonic() - t0:.3f}s")
        for ci in clients:
            ci.close()
    finally:
        c.stop(graceful=False)


def main(argv: list[str]) -> None:
    names = argv or list(SECTIONS)
    for name in names:
        print(f"== {name}", flush=True)
        SECTIONS[name]()


if __name__ == "__main__":
    main(sys.argv[1:])
