"""Least loaded: the engine with the fewest requests in flight plus waiting; ties broken at random."""

from __future__ import annotations

import random
from collections.abc import Sequence

from kvstack.router.engines import EngineState
from kvstack.router.policies.base import Decision, Policy, RequestFeatures


def engine_score(engine: EngineState) -> float:
    """The router's own in-flight count (fresh) plus the engine's queue from its last scrape.

    The waiting queue counts twice on purpose: a queued request means the engine's batch is full,
    which costs far more TTFT than one more running request.
    """
    return engine.in_flight + (engine.num_waiting or 0.0)


def least_loaded(candidates: Sequence[EngineState], rng: random.Random) -> EngineState:
    """A uniformly random choice among the candidates with the lowest score."""
    best = min(engine_score(e) for e in candidates)
    tied = [e for e in candidates if engine_score(e) == best]
    # Never "the first one": with many routers (or a burst) that would pile onto one engine.
    return tied[0] if len(tied) == 1 else rng.choice(tied)


class LeastLoadedPolicy(Policy):
    """Sends each request to the least busy engine."""

    name = "least_loaded"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, request: RequestFeatures, candidates: Sequence[EngineState], now: float) -> Decision:
        return Decision(engine=least_loaded(candidates, self._rng), reason="least_loaded")
