"""Routing-decision microbenchmark: ``CacheAwarePolicy.choose()`` in-process on a populated index.

The goal is p99 <= 2 ms for 8K-token prompts once their tokenization is cached. Each engine's
index is filled through real ``BlockStored`` events up to its block budget (vLLM's default H200
size unless told), with prompts that share system prompts across engines, so lookups walk real
chains. Prompts repeat (the proxy hands the same token tuple for the same text), and a second pass
times prompts never seen before, whose block keys must be hashed in the decision.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from typing import Any

from kvstack.bench import stats
from kvstack.common.blocks import block_keys
from kvstack.common.kv_events import BlockStored
from kvstack.router.engines import Endpoint, EngineState
from kvstack.router.kvindex.index import KVIndex
from kvstack.router.kvindex.keys import request_root
from kvstack.router.policies.base import RequestFeatures
from kvstack.router.policies.cache_aware import CacheAwarePolicy
from kvstack.router.policies.cache_aware_settings import CacheAwareSettings

MODEL = "kvstack/sim-8b"


def _engines(n: int, block_size: int, num_gpu_blocks: int) -> list[EngineState]:
    out = []
    for i in range(n):
        ep = Endpoint(f"http://10.0.0.{i + 1}:8000", f"engine-{i}", frozenset({MODEL}), "tcp://x:5557")
        st = EngineState(endpoint=ep, models=ep.models, block_size=block_size, num_gpu_blocks=num_gpu_blocks)
        st.num_running, st.num_waiting, st.last_scrape = 8.0, 0.0, 1.0
        out.append(st)
    return out


def _store(policy: CacheAwarePolicy, url: str, tokens: Sequence[int], block_size: int, seed: int) -> None:
    """Feed ``tokens``' full blocks to the index as one engine's event, with engine-side hashes."""
    n = len(tokens) // block_size
    rng = random.Random(seed)
    hashes = [rng.getrandbits(64) for _ in range(n)]
    policy.index.apply(
        url,
        [BlockStored(hashes, None, list(tokens[: n * block_size]), block_size)],
    )


def run(
    *,
    engines: int = 4,
    prompt_tokens: int = 8192,
    num_gpu_blocks: int = 56_169,
    block_size: int = 16,
    samples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Time ``choose()``; returns p50/p90/p99 in ms for cached and uncached tokenizations."""
    rng = random.Random(seed)
    policy = CacheAwarePolicy(KVIndex(), CacheAwareSettings(seed=seed), clock=time.perf_counter)
    cands = _engines(engines, block_size, num_gpu_blocks)
    for st in cands:
        policy.index.ensure_engine(st.url, model=MODEL, block_size=block_size, num_gpu_blocks=num_gpu_blocks)
    systems = [[rng.randrange(1, 50_000) for _ in range(prompt_tokens // 2)] for _ in range(16)]
    # Fill every engine to its block budget: prompts of system + unique tail, some systems on
    # several engines so a lookup finds holders of different depths.
    per_prompt = prompt_tokens // block_size
    prompts: list[tuple[int, ...]] = []
    for e, st in enumerate(cands):
        for j in range(num_gpu_blocks // per_prompt):
            sys_ = systems[(e + j) % len(systems)]
            tail = [rng.randrange(1, 50_000) for _ in range(prompt_tokens - len(sys_))]
            tokens = (*sys_, *tail)
            _store(policy, st.url, tokens, block_size, seed=e * 1_000_003 + j)
            if j < 64:
                prompts.append(tokens)
    # Requests: half repeat a stored prompt (deep hit on one engine), half a system prompt with a
    # new question (partial hit on the engines holding it).
    asks: list[tuple[int, ...]] = []
    for i in range(256):
        if i % 2:
            asks.append(prompts[rng.randrange(len(prompts))])
        else:
            sys_ = systems[rng.randrange(len(systems))]
            asks.append((*sys_, *(rng.randrange(1, 50_000) for _ in range(prompt_tokens - len(sys_)))))
    cached = _time(policy, cands, asks, samples)
    fresh = [
        tuple(rng.randrange(1, 50_000) for _ in range(prompt_tokens)) for _ in range(max(50, samples // 20))
    ]
    uncached = _time(policy, cands, fresh, len(fresh))
    root = request_root(MODEL, None, None)
    t0 = time.perf_counter()
    block_keys(fresh[0], block_size, root)
    hash_ms = 1000 * (time.perf_counter() - t0)
    return {
        "engines": engines,
        "prompt_tokens": prompt_tokens,
        "num_gpu_blocks": num_gpu_blocks,
        "indexed_blocks": policy.index.indexed_blocks,
        "cached_tokens_ms": cached,
        "uncached_tokens_ms": uncached,
        "block_hash_ms": hash_ms,
        "loadavg": list(os.getloadavg()),  # a p99 on a shared machine: note the contention
    }


def _time(
    policy: CacheAwarePolicy,
    cands: list[EngineState],
    asks: Sequence[tuple[int, ...]],
    samples: int,
) -> dict[str, float]:
    """Decision times in ms (wall, and ``cpu_``: the thread's CPU time), and ``hit_share``: the
    decisions that found a cached prefix."""
    times: list[float] = []
    cpu: list[float] = []
    hits = 0
    for i in range(samples):
        features = RequestFeatures(
            model=MODEL, request_id=f"bench-{i}", prompt_token_ids=asks[i % len(asks)], max_tokens=64
        )
        c0, t0 = time.thread_time(), time.perf_counter()
        decision = policy.choose(features, cands, t0)
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
        hits += decision.predicted_hit_tokens > 0
        policy.on_dispatch(features, decision)
        policy.on_finish(features, decision, True)
    out = {k: 1000 * v for k, v in stats.summarize(times).items()}
    # CPU time is what the decision costs; wall time adds whatever else the machine was running
    out.update({f"cpu_{k}": 1000 * v for k, v in stats.summarize(cpu).items()})
    out["hit_share"] = hits / samples if samples else 0.0
    return out
