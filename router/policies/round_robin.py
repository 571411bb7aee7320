"""Round robin: each request goes to the next available engine, in registry order."""

from __future__ import annotations

from collections.abc import Sequence

from kvstack.router.engines import EngineState
from kvstack.router.policies.base import Decision, Policy, RequestFeatures


class RoundRobinPolicy(Policy):
    """Rotates over the candidates; the rotation survives engines joining and leaving."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, request: RequestFeatures, candidates: Sequence[EngineState], now: float) -> Decision:
        engine = candidates[self._next % len(candidates)]
        self._next += 1
        return Decision(engine=engine, reason="round_robin")
