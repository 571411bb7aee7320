"""An exact index of which engine holds which KV block, fed by vLLM KV events. Pure: no I/O.

Keys are the router's own chained hashes (:mod:`kvstack.common.blocks`), recomputed from each
``BlockStored``'s ``token_ids``; a per-engine map from the engine's hash to our keys resolves
``BlockRemoved`` and parent links, so engine hash seeds never matter. Every engine owns its own
containers, each bounded by that engine's block count times a slack, so the whole index is bounded
by the sum over engines; clearing or dropping an engine swaps in empty containers in O(1).

Three sources mark a block as on an engine's GPU: confirmed events, speculative entries written at
dispatch (expire after a TTL unless an event confirms them), and, for engines that publish no
events, an approximate LRU of what was dispatched there. Non-GPU events (LMCache's CPU tier)
count for their engine at the CPU weight and, with a shared remote store, for every engine at the
shared weight. A tier's weight is what a token loaded from it saves against computing it
(``tier_weights``), from load costs measured on the engines (bench-results/lmcache/README.md).
Each engine's containers are an ``EngineSlice`` (``engine_slice``); this module holds the rules
that fill them from events and dispatches and read them for a request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from kvstack.common.blocks import extend_keys
from kvstack.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvstack.router.kvindex.engine_slice import CPU, GPU, EngineSlice, tier_of
from kvstack.router.kvindex.keys import request_root
from kvstack.router.kvindex.prefix import longest_prefix
from kvstack.router.kvindex.tier_weights import H200_CPU_WEIGHT, H200_SHARED_WEIGHT


class IndexSettings(BaseModel):
    """Tunables of the block index (weights are fractions of a GPU hit's value, see tier_weight)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu_weight: float = Field(1.0, ge=0.0, le=1.0)
    # Were 0.8 and 0.6, guesses: a Redis "hit" then pulled 60% of a GPU hit's weight onto every
    # engine, so the engine holding the prefix on its GPU led by 40% of the prompt where it really
    # leads by the whole compute and a Redis load that is 5x slower than computing.
    cpu_weight: float = Field(round(H200_CPU_WEIGHT, 2), ge=0.0, le=1.0)
    shared_weight: float = Field(round(H200_SHARED_WEIGHT, 2), ge=0.0, le=1.0)
    # LMCache writes its CPU chunks through to the shared remote store (Redis), so every engine
    # can load them; turn off when engines run LMCache without a remote store.
    shared_store: bool = True
    # LMCache also writes every chunk its engine prefills through to that store, and engines that
    # send no KV events for their LMCache tiers (vLLM 0.24 + LMCache 0.5.3 sent none on the H200,
    # 2026-12-05) leave the index blind to it: on, what any engine's GPU stores counts as in the
    # shared store too, so a session sent to another engine is priced as the Redis load LMCache
    # will make there (~5x computing the tokens), not as a recompute. The chart and the operator
    # turn it on when the engines run LMCache with a shared store.
    shared_store_from_gpu: bool = False
    capacity_slack: float = Field(1.25, ge=1.0)
    default_engine_blocks: int = Field(50_000, gt=0)  # until vllm:cache_config_info says
    shared_capacity_blocks: int = Field(200_000, gt=0)
    speculative_ttl_s: float = Field(2.0, gt=0.0)
    default_block_size: int = Field(16, gt=0)
    max_orphans_per_engine: int = Field(1024, ge=0)


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """How many leading blocks of a request an engine can serve, by nested tier."""

    block_size: int
    gpu_blocks: int = 0  # on the engine's GPU (confirmed, speculative or approximate)
    local_blocks: int = 0  # GPU or the engine's own CPU tier; >= gpu_blocks
    reachable_blocks: int = 0  # ... or the shared store; >= local_blocks

    def hit_tokens(self, settings: IndexSettings) -> float:
        """Tier-weighted matched tokens: what vLLM loads from GPU, then LMCache CPU, then remote."""
        blocks = (
            self.gpu_blocks * settings.gpu_weight
            + (self.local_blocks - self.gpu_blocks) * settings.cpu_weight
            + (self.reachable_blocks - self.local_blocks) * settings.shared_weight
        )
        return blocks * self.block_size


@dataclass(slots=True)
class IndexCounters:
    """Plain counters the router exports as metrics."""

    events_applied: int = 0
    blocks_stored: int = 0
    blocks_removed: int = 0
    clears: int = 0
    orphans_dropped: int = 0  # BlockStored whose parent never arrived
    skipped_events: int = 0  # malformed or unsupported (sliding window, odd block size, no model)
    evicted_at_cap: int = 0  # our entries dropped because an engine exceeded its block budget


class KVIndex:
    """Which engines hold which blocks. All methods are synchronous and run on the event loop."""

    def __init__(self, settings: IndexSettings | None = None) -> None:
        self.settings = settings or IndexSettings()
        self._engines: dict[str, EngineSlice] = {}
        self._shared: OrderedDict[int, None] = OrderedDict()
        self.counters = IndexCounters()

    # -- membership ----------------------------------------------------------------------------

    def ensure_engine(
        self,
        engine_id: str,
        *,
        model: str | None = None,
        block_size: int | None = None,
        num_gpu_blocks: int | None = None,
        events: bool = True,
    ) -> int:
        """Register ``engine_id`` or refresh what discovery learned about it (cheap; idempotent).

        Returns the block size its keys are cut at (the policy needs it next, for every candidate).
        """
        eng = self._engines.get(engine_id)
        cap = int((num_gpu_blocks or self.settings.default_engine_blocks) * self.settings.capacity_slack)
        if eng is None:
            eng = self._engines[engine_id] = EngineSlice(
                model, block_size or self.settings.default_block_size, cap, events
            )
            return eng.block_size
        if model is not None:
            eng.model = model
        if num_gpu_blocks is not None:
            eng.cap = cap
        eng.events = events
        if block_size is not None and block_size != eng.block_size and not eng.sized_by_events:
            eng.block_size = block_size
            eng.reset(keep_cpu=True)  # keys at the old size can never match again
        return eng.block_size

    def remove_engine(self, engine_id: str) -> None:
        """Forget an engine that left; nothing of it can win a later decision."""
        self._engines.pop(engine_id, None)

    def reset_engine(self, engine_id: str) -> None:
        """Drop everything an engine held (it restarted: GPU and its own CPU tier are gone)."""
        eng = self._engines.get(engine_id)
        if eng is not None:
            eng.reset()
            self.counters.clears += 1

    def engines(self) -> list[str]:
        return list(self._engines)

    def block_size(self, engine_id: str) -> int:
        eng = self._engines.get(engine_id)
        return eng.block_size if eng is not None else self.settings.default_block_size

    # -- events --------------------------------------------------------------------------------

    def apply(self, engine_id: str, events: Iterable[KVEvent]) -> None:
        """Apply one engine's events in order."""
        eng = self._engines.get(engine_id)
        if eng is None:
            self.counters.skipped_events += 1
            return
        for ev in events:
            self.counters.events_applied += 1
            if isinstance(ev, BlockStored):
                pending = [ev]
                while pending:  # a stored block may release children that arrived before it
                    pending.extend(self._stored(eng, pending.pop()))
            elif isinstance(ev, BlockRemoved):
                self._removed(eng, ev)
            elif isinstance(ev, AllBlocksCleared):
                eng.reset(keep_cpu=True)  # vLLM's reset_prefix_cache empties the GPU cache only
                self.counters.clears += 1

    def _stored(self, eng: EngineSlice, ev: BlockStored) -> list[BlockStored]:
        """Index one event; returns parked children it unblocked."""
        if (ev.kv_cache_spec_kind not in (None, "full_attention")) or (ev.group_idx or 0) != 0:
            self.counters.skipped_events += 1  # hybrid models: only the full-attention group prefixes
            return []
        tier = tier_of(ev.medium)
        size = ev.block_size
        if size <= 0 or len(ev.token_ids) != size * len(ev.block_hashes):
            self.counters.skipped_events += 1
            return []
        if tier == GPU and size != eng.block_size:
            # the engine's own events are the truth about its block size
            eng.block_size = size
            eng.reset(keep_cpu=True)
        if tier == GPU:
            eng.sized_by_events = True
        if size % eng.block_size:
            self.counters.skipped_events += 1
            return []
        if ev.parent_block_hash is None:
            if eng.model is None:
                self.counters.skipped_events += 1
                return []
            parent = request_root(eng.model, ev.lora_name, _salt(ev))
        else:
            parent_keys = eng.by_hash[tier].get(ev.parent_block_hash)
            if parent_keys is None:
                self._park(eng, ev)
                return []
            parent = parent_keys[-1]
        keys = extend_keys(parent, ev.token_ids, eng.block_size)
        per = size // eng.block_size
        for i, ehash in enumerate(ev.block_hashes):
            self._hold(eng, tier, ehash, tuple(keys[i * per : (i + 1) * per]))
        self.counters.blocks_stored += len(ev.block_hashes)
        unblocked: list[BlockStored] = []
        if eng.orphans:
            for ehash in ev.block_hashes:
                unblocked.extend(eng.orphans.pop(ehash, ()))
        return unblocked

    def _hold(self, eng: EngineSlice, tier: int, ehash: int, keys: tuple[int, ...]) -> None:
        by_hash, held = eng.by_hash[tier], eng.held[tier]
        old = by_hash.pop(ehash, None)
        if old is not None:
            self._release(eng, tier, old)
        by_hash[ehash] = keys
        eng.n_keys[tier] += len(keys)
        for k in keys:
            held[k] = held.get(k, 0) + 1
        if tier == GPU:
            for k in keys:
                eng.spec.pop(k, None)  # confirmed
        if self.settings.shared_store and (tier != GPU or self.settings.shared_store_from_gpu):
            shared = self._shared
            for k in keys:
                shared[k] = None
                shared.move_to_end(k)
            while len(shared) > self.settings.shared_capacity_blocks:
                shared.popitem(last=False)
        while eng.n_keys[tier] > eng.cap and by_hash:
            _, dropped = by_hash.popitem(last=False)
            self._release(eng, tier, dropped)
            self.counters.evicted_at_cap += len(dropped)

    def _release(self, eng: EngineSlice, tier: int, keys: tuple[int, ...]) -> None:
        held = eng.held[tier]
        eng.n_keys[tier] -= len(keys)
        for k in keys:
            n = held.get(k, 0) - 1
            if n > 0:
                held[k] = n
            else:
                held.pop(k, None)

    def _park(self, eng: EngineSlice, ev: BlockStored) -> None:
        """Hold a child whose parent is unknown until the parent arrives (bounded)."""
        if self.settings.max_orphans_per_engine == 0:
            self.counters.orphans_dropped += 1
            return
        assert ev.parent_block_hash is not None
        eng.orphans.setdefault(ev.parent_block_hash, []).append(ev)
        parked = sum(len(v) for v in eng.orphans.values())
        while parked > self.settings.max_orphans_per_engine:
            _, dropped = eng.orphans.popitem(last=False)
            parked -= len(dropped)
            self.counters.orphans_dropped += len(dropped)

    def _removed(self, eng: EngineSlice, ev: BlockRemoved) -> None:
        tier = tier_of(ev.medium)
        by_hash = eng.by_hash[tier]
        for ehash in ev.block_hashes:
            keys = by_hash.pop(ehash, None)
            if keys is not None:
                self._release(eng, tier, keys)
                self.counters.blocks_removed += 1
            eng.orphans.pop(ehash, None)
        # The shared remote copy outlives the engine's CPU eviction; its own LRU bounds it.

    # -- dispatch feedback ---------------------------------------------------------------------

    def record_dispatch(self, engine_id: str, keys: Sequence[int], now: float) -> None:
        """The request with ``keys`` went to ``engine_id``: it will hold them shortly."""
        eng = self._engines.get(engine_id)
        if eng is None or not keys:
            return
        if eng.events:
            spec, expiry = eng.spec, now + self.settings.speculative_ttl_s
            while spec and next(iter(spec.values())) <= now:
                spec.popitem(last=False)
            # The confirmed prefix needs no speculation: write only the tail (a repeat of a long
            # cached prompt then costs a few entries, not one per block of it).
            gpu = eng.held[GPU]
            for k in keys[longest_prefix(keys, gpu.__contains__) :]:
                spec[k] = expiry
                spec.move_to_end(k)
            while len(spec) > eng.cap:
                spec.popitem(last=False)
        else:
            approx = eng.approx
            # deepest first, so the root is most recent: LRU then evicts tails first, as vLLM
            # does, which keeps the set prefix-closed
            for k in reversed(keys):
                approx[k] = None
                approx.move_to_end(k)
            while len(approx) > eng.cap:
                approx.popitem(last=False)

    # -- lookup --------------------------------------------------------------------------------

    def match(self, engine_id: str, keys: Sequence[int], now: float) -> PrefixMatch:
        """Longest prefix of ``keys`` per tier on ``engine_id`` (keys at its block size)."""
        eng = self._engines.get(engine_id)
        if eng is None:
            return PrefixMatch(self.settings.default_block_size)
        return PrefixMatch(eng.block_size, *self._tiers(eng, keys, now))

    def hit_tokens(self, engine_id: str, keys: Sequence[int], now: float) -> float:
        """``match(...).hit_tokens(settings)`` without building the match: once per candidate per
        request, the policy's hot path."""
        eng = self._engines.get(engine_id)
        if eng is None or not keys:
            return 0.0
        g, loc, reach = self._tiers(eng, keys, now)
        st = self.settings
        return (
            g * st.gpu_weight + (loc - g) * st.cpu_weight + (reach - loc) * st.shared_weight
        ) * eng.block_size

    def backed_blocks(self, engine_id: str, keys: Sequence[int], upto: int) -> tuple[int, int]:
        """Leading blocks of ``keys[:upto]`` held in the engine's own CPU tier, and in that tier or
        the shared store: where GPU blocks evicted before their request runs reload from (LMCache
        writes chunks through to both; a partial last chunk to neither, so that tail recomputes).
        Not on the lookup hot path: the policy asks only for engines with a GPU hit at risk."""
        eng = self._engines.get(engine_id)
        if eng is None or upto <= 0:
            return 0, 0
        head = keys[:upto]
        cpu, shared = eng.held[CPU], self._shared
        in_cpu = longest_prefix(head, cpu.__contains__, 0) if cpu else 0
        if not shared:
            return in_cpu, in_cpu

        def stored(k: int) -> bool:
            return k in cpu or k in shared

        return in_cpu, longest_prefix(head, stored, in_cpu)

    def _tiers(self, eng: EngineSlice, keys: Sequence[int], now: float) -> tuple[int, int, int]:
        """Blocks of ``keys`` matched on the GPU, locally (GPU or CPU), and reachable (or shared)."""
        if not keys:
            return 0, 0, 0
        gpu, spec, approx, cpu, shared = eng.held[GPU], eng.spec, eng.approx, eng.held[CPU], self._shared

        def on_gpu(k: int) -> bool:
            return k in gpu or k in approx or spec.get(k, 0.0) > now

        g = longest_prefix(keys, on_gpu, 0)
        loc = g
        if cpu:

            def local(k: int) -> bool:
                return k in cpu or on_gpu(k)

            loc = longest_prefix(keys, local, g)
        if not shared:
            return g, loc, loc
        cpu_ = cpu

        def reachable(k: int) -> bool:
            return k in shared or k in cpu_ or on_gpu(k)

        return g, loc, longest_prefix(keys, reachable, loc)

    # -- stats ---------------------------------------------------------------------------------

    @property
    def indexed_blocks(self) -> int:
        """Confirmed and approximate entries held (speculative ones excluded)."""
        total = len(self._shared)
        for eng in self._engines.values():
            total += len(eng.held[GPU]) + len(eng.held[CPU]) + len(eng.approx)
        return total

    @property
    def speculative_blocks(self) -> int:
        return sum(len(eng.spec) for eng in self._engines.values())

    @property
    def capacity_blocks(self) -> int:
        """The bound on entries: per-engine caps (GPU, CPU, approx, speculative) plus the shared LRU."""
        return self.settings.shared_capacity_blocks + sum(4 * eng.cap for eng in self._engines.values())


def _salt(ev: BlockStored) -> str | None:
    """The cache salt vLLM puts in the first block's extra keys (strings other than the LoRA name)."""
    if not ev.extra_keys:
        return None
    first = ev.extra_keys[0]
    items = first if isinstance(first, list | tuple) else [first]
    salts = [x for x in items if isinstance(x, str) and x != ev.lora_name]
    return salts[-1] if salts else None
