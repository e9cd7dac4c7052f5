"""The checks of a rollout's audiences and of its ramp: named matches the steps send to the canary, and a split
order and weights under which a user on the canary stays there (docs/rollout.md, "Audiences")."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from grayagent.errors import Problem
from grayagent.rules.docload import format_path
from grayagent.rules.modeldata import Audience, RolloutStep, Rule, Split, audience_rule_name

if TYPE_CHECKING:
    from grayagent.rules.semantics import MatchChecker


class AudienceChecker:
    """Reports into the document's shared problem list, as the semantic stage's checkers do."""

    def __init__(self, source: str, problems: list[Problem], matches: MatchChecker) -> None:
        self.source = source
        self.problems = problems
        self.matches = matches  # audiences are matches, checked as rules are

    def problem(self, path: Iterable[str | int], message: str) -> None:
        self.problems.append(Problem(self.source, format_path(path), message))

    def audiences(self, raw: dict[str, Any], path: list[str | int], canary: str,
                  rules: tuple[Rule, ...]) -> tuple[Audience, ...]:
        """rollout.audiences as the model, and the audience steps against them (docs/rollout.md "Audiences").

        An audience becomes the rule `audience-NAME` -> canary, appended after the service's own rules. A rule of
        that name may exist only as exactly that generated rule, after the service's own rules (a published
        stage document holds it); anything else would be overwritten or shadowed.
        """
        audiences: list[Audience] = []
        for name, match in raw.get("audiences", {}).items():
            where = [*path, "audiences", name]
            first = len(self.problems)
            rule = self.matches.rule({"name": audience_rule_name(name), "match": match, "to": canary}, where,
                                     {canary})
            # rule() names a condition under `match`; an audience is the match itself.
            prefix = format_path([*where, "match"])
            for i in range(first, len(self.problems)):
                bad = self.problems[i]
                if bad.path == prefix or bad.path.startswith((prefix + ".", prefix + "[")):
                    self.problems[i] = Problem(bad.source, format_path(where) + bad.path[len(prefix):], bad.message)
            audiences.append(Audience(name, rule.conditions))
        generated = {a.rule_name: a for a in audiences}
        declared = [a.name for a in audiences]
        own = [i for i, r in enumerate(rules) if r.name not in generated]
        for i, rule in enumerate(rules):
            audience = generated.get(rule.name)
            if audience is None:
                continue
            if rule.to != canary or rule.conditions != audience.conditions or (own and own[-1] > i):
                self.problem([*path, "audiences", audience.name],
                             f"its rule name {rule.name!r} is taken by rules[{i}], which is not the rule the rollout "
                             f"adds (the same match, to {canary!r}, after the service's own rules); rename the "
                             "audience or that rule")
        added: dict[str, int] = {}
        for i, step in enumerate(raw["steps"]):
            name = step.get("audience")
            if name is None:
                continue
            if name not in declared:
                known = ", ".join(declared) or "none is declared"
                self.problem([*path, "steps", i, "audience"],
                             f"unknown audience {name!r}; declare it under rollout.audiences (known: {known})")
            elif name in added:
                self.problem([*path, "steps", i, "audience"],
                             f"audience {name!r} is already added by steps[{added[name]}]; audiences accumulate")
            else:
                added[name] = i
        return tuple(audiences)

    def ramp(self, raw: dict[str, Any], path: list[str | int], steps: list[RolloutStep], split: Split | None,
             canary: str, stable: str) -> None:
        """The ramp must be monotone: a user on the canary at one step stays on it at every later step.

        nginx cuts a split into cumulative bucket ranges in listing order (routing.split_parts), and only the canary
        and the stable upstream change weight. With the canary right before the stable upstream, the canary's
        range keeps its start and its end only grows; last, right after it, its end is the top and its start only
        falls. Any other order moves users between upstreams (the sum of floored boundaries also jitters by one
        bucket, which only the canary-last order escapes at the canary's end). Weights must not go down either.
        """
        from grayagent.rules.semantics import parse_weight  # semantics imports this module

        highest: tuple[int, int] | None = None
        for i, step in enumerate(raw["steps"]):
            weight = parse_weight(step["weight"]) if "weight" in step else None
            if weight is None:
                continue
            if highest is not None and weight < highest[1]:
                self.problem([*path, "steps", i, "weight"],
                             f"{step['weight']}% is below steps[{highest[0]}]'s {Decimal(highest[1]) / 100}%: a ramp "
                             "only grows, so users on the canary stay there (to go back, abort the rollout)")
            elif highest is None or weight > highest[1]:
                highest = (i, weight)
        if split is None or not any(s.weight is not None for s in steps):
            return
        order = [n for n, w in split.weights if n in (canary, stable) or w > 0]  # nginx leaves 0 % parts out
        if canary not in order or stable not in order or len(order) <= 2:
            return
        c, s = order.index(canary), order.index(stable)
        if s == c + 1 or (c == len(order) - 1 and s == c - 1):
            return
        listed = [n for n, _ in split.weights]
        rest = [n for n in listed if n not in (canary, stable)]
        self.problem([*path[:-1], "split", "weights"],
                     f"the rollout cannot ramp {canary!r} in this order ({', '.join(listed)}): users would move "
                     f"between upstreams as the weights change; list {canary!r} right before {stable!r}, e.g. "
                     f"{', '.join([*rest, canary, stable])}, or last right after it: "
                     f"{', '.join([*rest, stable, canary])}")
