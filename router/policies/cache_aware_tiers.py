"""The cache-aware policy's view of LMCache tiers: expected residency and learnt tier costs.

The glue between the KV index, an engine's scraped state and the pure models in
:mod:`kvstack.router.residency` (how much of a GPU hit survives the queue ahead of it) and
:mod:`kvstack.router.tier_cost` (what a token from each tier costs, learnt from observed TTFTs).
No I/O: the policy calls :meth:`TierModel.estimate` per candidate and :meth:`TierModel.observe`
at each first token.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

from kvstack.router.engines import EngineState
from kvstack.router.kvindex.index import KVIndex, PrefixMatch
from kvstack.router.residency import (
    TierTokens,
    TierWeights,
    expected_tiers,
    free_kv_tokens,
    has_kv_room,
    resident_fraction,
)
from kvstack.router.tier_cost import Outcome, TierCosts, TierLearning, observe, weights


class TierEstimate(NamedTuple):
    """One candidate's predicted hit for one request."""

    match: PrefixMatch  # what the index holds now
    resident: float  # expected share of the GPU prefix left when the request runs
    tiers: TierTokens  # where the engine will serve the hit from
    hit_tokens: float  # tier-weighted: tokens the request saves computing
    load_s: float  # seconds of tier loads beyond what computing those tokens would take
    room: bool  # the engine's free KV holds the queue ahead and this request's new tokens


class TierModel:
    """Tier weights (learnt online when ``learning.enabled``) and each candidate's expected hit."""

    def __init__(
        self, index: KVIndex, learning: TierLearning, rate: float, *, residency: bool = True
    ) -> None:
        self.index = index
        self.learning = learning
        self.rate = rate
        self.residency = residency
        st = index.settings
        if learning.enabled:
            self.costs = TierCosts(cpu_s=learning.cpu_prior / rate, shared_s=learning.shared_prior / rate)
        else:
            fixed = TierWeights(st.gpu_weight, st.cpu_weight, st.shared_weight)
            self.costs = TierCosts.from_weights(fixed, rate)
        self.outcomes: Counter[str] = Counter()

    def weights(self) -> TierWeights:
        return weights(self.costs, self.rate, gpu=self.index.settings.gpu_weight)

    def estimates(
        self,
        candidates: Sequence[EngineState],
        keys: Sequence[Sequence[int]],
        queued: Sequence[float],
        prompt_tokens: int,
        now: float,
        w: TierWeights,
    ) -> list[TierEstimate]:
        """Every candidate's expected hit; the residency discount applies only while at least one
        of them has KV room for the request (:func:`has_kv_room`)."""
        out = [
            self.estimate(st, k, q, prompt_tokens, now, w)
            for st, k, q in zip(candidates, keys, queued, strict=True)
        ]
        if any(e.room for e in out) or all(e.resident == 1.0 for e in out):
            return out
        return [
            e if e.resident == 1.0 else self.estimate(st, k, q, prompt_tokens, now, w, discount=False)
            for e, st, k, q in zip(out, candidates, keys, queued, strict=True)
        ]

    def estimate(
        self,
        st: EngineState,
        keys: Sequence[int],
        queued_tokens: float,
        prompt_tokens: int,
        now: float,
        w: TierWeights,
        *,
        discount: bool = True,
    ) -> TierEstimate:
        """``st``'s expected hit for a request with ``keys``, behind ``queued_tokens`` of prefill."""
        index = self.index
        m = index.match(st.url, keys, now)
        resident, free = 1.0, None
        if self.residency:
            free = free_kv_tokens(st.kv_cache_usage, st.num_gpu_blocks, m.block_size)
            if discount and m.gpu_blocks:
                resident = resident_fraction(queued_tokens, free)
        room = has_kv_room(free, queued_tokens, max(0.0, prompt_tokens - m.gpu_blocks * m.block_size))
        cpu_backed = store_backed = m.gpu_blocks
        if resident < 1.0:
            cpu_backed, store_backed = index.backed_blocks(st.url, keys, m.gpu_blocks)
            if not index.settings.shared_store:
                store_backed = cpu_backed
        tiers = expected_tiers(
            m.gpu_blocks, cpu_backed, store_backed, m.local_blocks, m.reachable_blocks, m.block_size, resident
        )
        compute_s = 1.0 / self.rate
        load_s = tiers.cpu * max(0.0, self.costs.cpu_s - compute_s) + tiers.shared * max(
            0.0, self.costs.shared_s - compute_s
        )
        return TierEstimate(m, resident, tiers, tiers.weighted(w), load_s, room)

    def observe(
        self, tiers: TierTokens, predicted_s: float, observed_s: float, queued_tokens: float
    ) -> Outcome:
        """Fold one request's time to first token (from dispatch) into the learnt costs."""
        self.costs, outcome = observe(
            self.costs, tiers, predicted_s, observed_s, self.learning, queued_tokens
        )
        self.outcomes[outcome.value] += 1
        return outcome
