"""Expected residency of a GPU prefix hit, and what a hit is worth once eviction is counted (pure).

The KV index says which blocks an engine holds *now*. A request sent there runs only after the
prefill queued ahead of it, and vLLM allocates that queue's new blocks from its free-block queue:
cached blocks no running request references sit in that queue, and the oldest go first. So a
prefix the index counts as a GPU hit is gone by the time its request runs when the queue ahead
needs more new blocks than the engine has free; the engine then reloads it from LMCache's CPU
tier, from the shared store (Redis), or recomputes it. On the simulator at load 0.9 this is what
collapsed runs (bench-results/lmcache/README.md): the router kept sending sessions to their
holder while its queue evicted them.

The model, per engine and request:

* ``ahead``: KV tokens the work queued ahead will newly allocate (its uncached prefill);
* ``free``: the engine's free KV tokens, ``(1 - kv_cache_usage) x num_gpu_blocks x block_size``
  (cached blocks nobody references count as free: vLLM can evict them);
* an unreferenced prefix sits somewhere in the free queue; not knowing where, take its place as
  uniform over it, so each of its blocks survives with probability ``1 - ahead / free``, floored at
  0. vLLM frees a request's blocks tail first, so the tail of a prefix goes before its head: the
  surviving share is the prefix's *leading* share.

A block evicted from the GPU is worth what its next tier is worth: the engine's own CPU tier when
LMCache still holds it there, else the shared store when it holds it, else nothing (recomputed).
"""

from __future__ import annotations

from dataclasses import dataclass


def resident_fraction(ahead_tokens: float, free_tokens: float | None) -> float:
    """Expected share of a cached, unreferenced GPU prefix still there after ``ahead_tokens`` of new
    KV are allocated on an engine with ``free_tokens`` free. ``None`` (not scraped yet): 1."""
    if free_tokens is None or ahead_tokens <= 0:
        return 1.0
    if free_tokens <= 0:
        return 0.0
    return max(0.0, 1.0 - ahead_tokens / free_tokens)


def resident_by_recency(
    ahead_tokens: float, free_tokens: float | None, freed_since_tokens: float, prefix_tokens: float
) -> float:
    """Like :func:`resident_fraction`, with the prefix's place in the free queue known.

    vLLM's free queue is oldest-freed first; a prefix freed when its last request ended has ahead
    of it the free blocks freed before that: ``free - prefix - freed_since`` (``freed_since``: what
    the engine freed after it, at most the rest of the free queue). The queue ahead allocates from
    the head, so the prefix loses its tail blocks once the allocation passes that point.
    """
    if free_tokens is None or ahead_tokens <= 0 or prefix_tokens <= 0:
        return 1.0
    behind = min(max(0.0, free_tokens - prefix_tokens), max(0.0, freed_since_tokens))
    head = max(0.0, free_tokens - prefix_tokens - behind)
    evicted = min(prefix_tokens, max(0.0, ahead_tokens - head))
    return 1.0 - evicted / prefix_tokens


def has_kv_room(free_tokens: float | None, ahead_tokens: float, new_tokens: float) -> bool:
    """Whether an engine's free KV holds the queue ahead and the request's own new tokens (unknown
    free KV: assume so).

    The discount is only worth applying while some engine has that room: when every engine is
    KV-bound, the request waits for blocks wherever it goes, and the holder's prefix is still the
    best bet (on the simulator at load 0.9 past 45 s, 90% of such hits were served; discounting them
    all scattered sessions and lost 65 GPU hits instead of 3).
    """
    return free_tokens is None or free_tokens >= ahead_tokens + new_tokens


def free_kv_tokens(kv_cache_usage: float | None, num_gpu_blocks: int | None, block_size: int) -> float | None:
    """Free KV tokens from a scrape (``vllm:kv_cache_usage_perc`` as a 0-1 fraction); None if unknown."""
    if kv_cache_usage is None or not num_gpu_blocks:
        return None
    return max(0.0, 1.0 - kv_cache_usage) * num_gpu_blocks * block_size


@dataclass(frozen=True, slots=True)
class TierWeights:
    """What a token served from each tier is worth, as a fraction of a GPU hit (computing: 0)."""

    gpu: float = 1.0
    cpu: float = 0.94
    shared: float = 0.0


@dataclass(frozen=True, slots=True)
class TierTokens:
    """A request's predicted hit on one engine, in tokens, by the tier the engine will serve it from."""

    gpu: float = 0.0  # expected still on its GPU when the request runs
    cpu: float = 0.0  # from its own LMCache CPU tier (held there, or evicted from GPU to it)
    shared: float = 0.0  # from the shared store

    def weighted(self, w: TierWeights) -> float:
        return self.gpu * w.gpu + self.cpu * w.cpu + self.shared * w.shared


def expected_tiers(
    gpu_blocks: int,
    cpu_backed_blocks: int,
    store_backed_blocks: int,
    local_blocks: int,
    reachable_blocks: int,
    block_size: int,
    resident: float,
) -> TierTokens:
    """Where a request's matched prefix will come from, once the GPU prefix has lost its tail.

    ``gpu_blocks`` <= ``local_blocks`` <= ``reachable_blocks`` are the index's nested prefixes (GPU;
    GPU or own CPU tier; or the shared store). ``cpu_backed_blocks`` <= ``store_backed_blocks``: the
    leading runs held in the engine's CPU tier, and in it or the shared store (LMCache writes whole
    chunks through to both, so a GPU prefix's partial last chunk is in neither). ``resident`` comes
    from :func:`resident_fraction`. Blocks past the resident share of the GPU prefix fall to the CPU
    tier where it backs them, else to the shared store where it does, else to recomputing.
    """
    kept = resident * gpu_blocks
    cpu_end = min(float(cpu_backed_blocks), float(gpu_blocks))
    store_end = max(cpu_end, min(float(store_backed_blocks), float(gpu_blocks)))
    to_cpu = max(0.0, cpu_end - kept)
    to_shared = max(0.0, store_end - max(kept, cpu_end))
    return TierTokens(
        gpu=kept * block_size,
        cpu=(to_cpu + (local_blocks - gpu_blocks)) * block_size,
        shared=(to_shared + (reachable_blocks - local_blocks)) * block_size,
    )
