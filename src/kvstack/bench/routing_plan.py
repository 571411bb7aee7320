"""What ``kvstack bench routing`` runs: the full comparison, or its quick mode, from the options given.

The full run compares every policy on every workload in both regimes, three times, on four engines
(about an hour and a half on two cores). ``--quick`` keeps the comparison's shape (same table, plot
and goals, labelled quick) at a size that finishes in under two minutes on two cores: two engines
at half the KV and twice the speed (so traces last half as long), prompts at a quarter size, the two
workloads with the shortest traces in the under-filled regime, round robin against cache-aware,
once. Options given on the command line win over either mode's defaults.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from kvstack.bench.option_error import OptionError
from kvstack.bench.workloads import WORKLOADS, Regime

POLICIES = ("round_robin", "least_loaded", "session", "prefix_trie", "cache_aware")
REGIMES: tuple[Regime, ...] = ("under", "pressured")


@dataclass(frozen=True, slots=True)
class RoutingPlan:
    """The cases and the simulated cluster of one run."""

    quick: bool
    workloads: tuple[str, ...]
    regimes: tuple[Regime, ...]
    policies: tuple[str, ...]
    repeat: int
    engines: int
    num_gpu_blocks: int
    speed: float
    scale: float

    @property
    def cases(self) -> int:
        """Stacks started and traces replayed."""
        return len(self.workloads) * len(self.regimes) * len(self.policies) * self.repeat


FULL: Mapping[str, Any] = {
    "workloads": tuple(WORKLOADS),
    "regimes": REGIMES,
    "policies": POLICIES,
    "repeat": 3,
    "engines": 4,
    "num_gpu_blocks": 4096,
    "speed": 1.0,
    "scale": 1.0,
}
QUICK: Mapping[str, Any] = {
    "workloads": ("multi_round_qa", "long_doc_qa"),
    "regimes": ("under",),
    "policies": ("round_robin", "cache_aware"),
    "repeat": 1,
    "engines": 2,
    "num_gpu_blocks": 2048,  # the least a simulator takes at its 32K max_model_len
    "speed": 2.0,
    "scale": 0.25,
}


class PlanError(OptionError):
    """An option the plan cannot use; ``option`` names it as the command line spells it."""


def _known(option: str, names: Sequence[str], known: Sequence[str], what: str) -> tuple[str, ...]:
    for name in names:
        if name not in known:
            raise PlanError(option, f"unknown {what} {name!r}; known: {', '.join(known)}")
    return tuple(names)


def plan(quick: bool, **given: Any) -> RoutingPlan:
    """The plan of a run: ``quick`` picks the defaults, ``given`` (None: not given) overrides them."""
    values = {**(QUICK if quick else FULL), **{k: v for k, v in given.items() if v is not None}}
    for key in ("workloads", "regimes", "policies"):
        if not values[key]:
            values[key] = (QUICK if quick else FULL)[key]
    _known("--workload", values["workloads"], tuple(WORKLOADS), "workload")
    _known("--regime", values["regimes"], REGIMES, "regime")
    _known("--policy", values["policies"], POLICIES, "policy")
    if values["repeat"] < 1:
        raise PlanError("--repeat", "must be at least 1")
    return RoutingPlan(
        quick=quick,
        workloads=tuple(values["workloads"]),
        regimes=cast(tuple[Regime, ...], tuple(values["regimes"])),
        policies=tuple(values["policies"]),
        repeat=int(values["repeat"]),
        engines=int(values["engines"]),
        num_gpu_blocks=int(values["num_gpu_blocks"]),
        speed=float(values["speed"]),
        scale=float(values["scale"]),
    )
