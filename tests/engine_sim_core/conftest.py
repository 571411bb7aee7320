"""Fixtures for the simulator core: a recording listener (the real redis-server is `tests/conftest.py`'s)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvstack.engine.sim.latency import StepWork
from kvstack.engine.sim.types import FinishedRequestStats


@dataclass
class Recorder:
    """A StatsListener that keeps everything it is told."""

    iterations: list[tuple[int, int]] = field(default_factory=list)  # (prompt, generation) tokens
    prefix_queries: list[tuple[int, int]] = field(default_factory=list)
    external_queries: list[tuple[int, int]] = field(default_factory=list)
    prompt_sources: list[tuple[int, int, int]] = field(default_factory=list)
    preemptions: int = 0
    lora_steps: list[tuple[list[str], list[str], int]] = field(default_factory=list)
    lmcache_retrieves: list[tuple[int, int, float]] = field(default_factory=list)
    lmcache_stores: list[tuple[int, float]] = field(default_factory=list)
    lmcache_cpu_bytes: list[int] = field(default_factory=list)
    lmcache_evicted_chunks: list[int] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)
    finished_event: asyncio.Event = field(default_factory=asyncio.Event)

    def on_iteration(self, num_prompt_tokens: int, num_generation_tokens: int) -> None:
        self.iterations.append((num_prompt_tokens, num_generation_tokens))

    def on_prefix_cache_query(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries.append((queried_tokens, hit_tokens))

    def on_external_cache_query(self, queried_tokens: int, hit_tokens: int) -> None:
        self.external_queries.append((queried_tokens, hit_tokens))

    def on_prompt_tokens(self, local_compute: int, local_cache_hit: int, external_kv_transfer: int) -> None:
        self.prompt_sources.append((local_compute, local_cache_hit, external_kv_transfer))

    def on_preemption(self) -> None:
        self.preemptions += 1

    def on_lora_step(self, running: Sequence[str], waiting: Sequence[str], swaps: int) -> None:
        self.lora_steps.append((list(running), list(waiting), swaps))

    def on_lmcache_retrieve(self, requested_tokens: int, hit_tokens: int, seconds: float) -> None:
        self.lmcache_retrieves.append((requested_tokens, hit_tokens, seconds))

    def on_lmcache_store(self, stored_tokens: int, seconds: float) -> None:
        self.lmcache_stores.append((stored_tokens, seconds))

    def on_lmcache_usage(self, local_cpu_bytes: int, evicted_chunks: int) -> None:
        self.lmcache_cpu_bytes.append(local_cpu_bytes)
        self.lmcache_evicted_chunks.append(evicted_chunks)

    def on_request_finished(self, stats: FinishedRequestStats) -> None:
        self.finished.append(stats)
        self.finished_event.set()


def work(prefill: Sequence[tuple[int, int]] = (), decodes: Sequence[int] = (), **extra: int) -> StepWork:
    """One engine step's work: prefill chunks as (tokens, context) and decodes by context."""
    w = StepWork(**extra)
    for n, ctx in prefill:
        w.add_prefill(n, ctx)
    for ctx in decodes:
        w.add_decode(ctx)
    return w
