"""The cache-aware policy's view of LMCache tiers: expected residency and learnt tier costs.

The glue between the KV index, an engine's scraped state and the pure models in
:mod:`kvstack.router.residency` (how much of a GPU hit survives the queue ahead of it) and
:mod:`kvstack.router.tier_cost` (what a token from each tier costs, learnt from observed TTFTs).
No I/O: the policy calls :meth:`TierModel.estimate` per candidate and :meth:`TierModel.observe`
at each first token.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
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
    resident_by_recency,
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


class FreeOrder:
    """Where each prefix sits in its engine's free queue, from the requests the router sent there.

    A request's blocks go back to the free queue when it ends; what the engine frees afterwards sits
    behind them. Per engine, a running total of tokens freed by our requests' ends, and per prefix
    (its last block key) the total when its request ended: the difference is what was freed since.
    While a request holding the prefix runs, the prefix is referenced and cannot be evicted.
    Bounded: ``max_entries`` prefixes and running requests, the oldest dropped first.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self.freed: dict[str, float] = {}
        self.marks: OrderedDict[tuple[str, int], float] = OrderedDict()
        self.running: OrderedDict[str, tuple[str, int, float]] = OrderedDict()
        self.in_use: Counter[tuple[str, int]] = Counter()

    def dispatched(self, request_id: str, url: str, keys: Sequence[int], tokens: float) -> None:
        if not keys:
            return
        self.running[request_id] = (url, keys[-1], tokens)
        self.in_use[(url, keys[-1])] += 1
        while len(self.running) > self.max_entries:  # ends never reported: forget, mark nothing
            _, (old_url, old_last, _) = self.running.popitem(last=False)
            self._release((old_url, old_last))

    def finished(self, request_id: str) -> None:
        entry = self.running.pop(request_id, None)
        if entry is None:
            return
        url, last, tokens = entry
        slot = (url, last)
        self._release(slot)
        total = self.freed.get(url, 0.0) + tokens
        self.freed[url] = total
        self.marks[slot] = total
        self.marks.move_to_end(slot)
        while len(self.marks) > self.max_entries:
            self.marks.popitem(last=False)

    def _release(self, slot: tuple[str, int]) -> None:
        self.in_use[slot] -= 1
        if self.in_use[slot] <= 0:
            del self.in_use[slot]

    def place(self, url: str, keys: Sequence[int], upto: int, lookback: int = 64) -> float | None:
        """Tokens freed on ``url`` since the prefix ``keys[:upto]`` was (the deepest of its last
        ``lookback`` blocks that ended a request of ours); 0 while a request holding it runs; None
        when none of ours did (then the uniform model applies)."""
        freed = self.freed.get(url, 0.0)
        for j in range(upto - 1, max(-1, upto - 1 - lookback), -1):
            slot = (url, keys[j])
            if slot in self.in_use:
                return -1.0
            mark = self.marks.get(slot)
            if mark is not None:
                return freed - mark
        return None


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
        self.order = FreeOrder()

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
                since = self.order.place(st.url, keys, m.gpu_blocks)
                if since is None:
                    resident = resident_fraction(queued_tokens, free)
                elif since >= 0:  # (< 0: a request holding it runs there, it stays)
                    resident = resident_by_recency(queued_tokens, free, since, m.gpu_blocks * m.block_size)
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
