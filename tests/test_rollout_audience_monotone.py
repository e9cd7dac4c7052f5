"""The ramp is monotone: a user on the canary at one stage stays on it at every later stage.

12,000 seeded users (random IDs, some employees, some VIPs, some caught by operator rules, some without an ID) go
through every stage document (grayagent/rollout/document.py) of rollouts over splits with 2, 3 and 4 upstreams,
decided by grayagent.rules.routing; then 2,000 of them through a real nginx (reload mode) at two stages.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from grayagent.rollout.document import routing_steps, stage_document
from grayagent.rules.model import Service, parse_document
from grayagent.rules.routing import Request, route
from grayagent.stores.base import digest_of
from tests.agenthelp import nginx_target, wait_live
from tests.docs import document, dump, service
from tests.fidelity import FidelityRequest, send_all
from tests.servers.proc import free_port

OTHERS = {"beta": 12.5, "gamma": 7.25}
AUDIENCES = {"employees": {"headers": {"X-Employee": {"exact": "1"}}}, "vip": {"cookies": {"tier": {"exact": "vip"}}}}
RULES = [{"name": "force-stable", "match": {"headers": {"X-Force": {"exact": "stable"}}}, "to": "stable"},
         {"name": "vip-force-stable", "match": {"cookies": {"tier": {"exact": "vip"}}, "headers": {
             "X-Force": {"exact": "vip"}}}, "to": "stable"}]
BETA_RULE = {"name": "beta-testers", "match": {"headers": {"X-Beta": {"present": True}}}, "to": "beta"}


def rollout_document(order: tuple[str, ...], servers: dict[str, list[str]] | None = None,
                     listen: int | str = 8080) -> bytes:
    top = 100 - sum(OTHERS.get(n, 0) for n in order)
    weights = {n: OTHERS.get(n, top if n == "stable" else 0) for n in order}
    servers = servers or {n: [f"127.0.0.1:{9001 + i}"] for i, n in enumerate(order)}
    steps = [{"audience": "employees"}, {"pause": "24h"}, {"weight": 1}, {"audience": "vip", "weight": 5.55},
             {"pause": "manual"}, {"weight": 12.34}, {"weight": 33.33}, {"weight": 50}, {"weight": top}]
    rules = RULES + ([BETA_RULE] if "beta" in order else [])
    return dump(document(service("order", listen=listen, servers=servers, rules=rules, default="stable",
                                 split={"key": {"header": "X-User-Id"}, "weights": weights},
                                 rollout={"canary": "canary", "stable": "stable", "audiences": AUDIENCES,
                                          "steps": steps})))


def users(n: int, seed: int = 20261202) -> list[list[tuple[str, str]]]:
    """Each user's request headers: an ID (2 % have none), and the features audiences and rules look at."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        headers = [] if rng.random() < 0.02 else [("X-User-Id", f"u{rng.getrandbits(48):x}")]
        if rng.random() < 0.05:
            headers.append(("X-Employee", rng.choice(["1", "1", "0", "true"])))
        if rng.random() < 0.08:
            headers.append(("Cookie", rng.choice(["tier=vip", "tier=gold", "a=1; tier=vip"])))
        if rng.random() < 0.03:
            headers.append(("X-Force", rng.choice(["stable", "vip"])))
        if rng.random() < 0.03:
            headers.append(("X-Beta", "1"))
        out.append(headers)
    return out


USERS = users(12_000)


def stages(content: bytes) -> list[Service]:
    spec = parse_document(content, "d").service("order").rollout
    assert spec is not None
    count = len(routing_steps(spec))
    return [parse_document(stage_document(content, "d", "order", k), "d").service("order")
            for k in range(1, count + 1)]


def decide(svc: Service, people: list[list[tuple[str, str]]]) -> list[str]:
    return [route(svc, Request.build(h)).upstream for h in people]


ORDERS = [("stable", "canary"), ("canary", "stable"),
          ("canary", "stable", "beta"), ("beta", "canary", "stable"), ("beta", "stable", "canary"),
          ("canary", "stable", "beta", "gamma"), ("beta", "gamma", "canary", "stable"),
          ("gamma", "beta", "stable", "canary"), ("beta", "canary", "stable", "gamma")]


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_every_user_on_the_canary_stays_there_at_every_later_stage(order: tuple[str, ...]) -> None:
    answers = [decide(svc, USERS) for svc in stages(rollout_document(order))]
    assert len(answers) == 7
    for k in range(len(answers) - 1):
        before, after = answers[k], answers[k + 1]
        left = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a == "canary" and b != "canary"]
        assert not left, f"stage {k + 1} -> {k + 2}: {len(left)} users left the canary, e.g. {USERS[left[0]]}"
        # Nobody else moves either: a user who is not on the canary later is where they were.
        moved = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if b != "canary" and a != b]
        assert not moved, f"stage {k + 1} -> {k + 2}: {len(moved)} users moved between other upstreams"
    shares = [a.count("canary") / len(USERS) for a in answers]
    assert shares == sorted(shares) and shares[0] > 0 and shares[-1] < 1  # force-stable and beta testers stay
    employee = next(i for i, h in enumerate(USERS) if ("X-Employee", "1") in h and not any(
        k in ("X-Force", "X-Beta") for k, _ in h))
    assert all(a[employee] == "canary" for a in answers)


def test_the_refused_orders_would_move_users() -> None:
    """Why validation refuses them: the same ramp over a split without a rollout section (which is not checked)
    moves users off the canary or between the other upstreams."""
    people = [[("X-User-Id", f"u{i}")] for i in range(12_000)]
    servers = {n: [f"127.0.0.1:{9001 + i}"] for i, n in enumerate(("stable", "canary", "beta"))}
    for order in (("canary", "beta", "stable"), ("stable", "beta", "canary")):
        answers = []
        for weight in (0, 1, 5.55, 12.34, 33.33, 50, 87.5):
            weights = {"beta": 12.5, "stable": 87.5 - weight, "canary": weight}
            split = {"key": {"header": "X-User-Id"}, "weights": {n: weights[n] for n in order}}
            svc = parse_document(dump(document(service("order", servers=servers, split=split))), "d").services[0]
            answers.append(decide(svc, people))
        moves = sum(a != b and (a == "canary" or b != "canary")
                    for x, y in itertools.pairwise(answers) for a, b in zip(x, y, strict=True))
        assert moves > 1000, order


# ---------------------------------------------------------------------------------------------- real nginx


def test_real_nginx_keeps_canary_users_on_the_canary_between_two_stages(nginx: Any, backends: Any) -> None:
    order = ("beta", "stable", "canary")
    port = free_port()
    content = rollout_document(order, {n: [f"127.0.0.1:{backends[n].port}"] for n in order}, f"127.0.0.1:{port}")
    people = USERS[:2000]
    target = nginx_target(nginx)
    seen = []
    for version, stage in enumerate((3, 5), start=1):
        staged = stage_document(content, "d", "order", stage)
        release = parse_document(staged, "d")
        result = target.apply(target.render(release, version, digest_of(staged)), version, digest_of(staged))
        assert result.ok, result.error
        wait_live(nginx, version)
        answers = send_all([FidelityRequest("order", "/", list(h)) for h in people], {"order": port})
        assert answers == decide(release.service("order"), people)
        seen.append(answers)
    before, after = seen
    assert 100 < before.count("canary") < after.count("canary")
    assert all(b == "canary" for a, b in zip(before, after, strict=True) if a == "canary")
