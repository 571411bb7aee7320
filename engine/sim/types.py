"""The boundary between the simulated engine core and its HTTP/metrics/events front end.

The core (``engine.sim.core.SimEngine``) owns the KV cache, the scheduler and simulated time; the
server turns OpenAI requests into :class:`SimRequest`, streams :class:`RequestOutput` back,
renders metrics from :class:`StatsListener` callbacks and engine gauges, and publishes the KV
events the core hands to its ``event_sink``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from kvstack.common.kv_events import KVEvent

FinishReason = Literal["length", "stop", "abort"]


@dataclass(slots=True)
class SimRequest:
    """One generation request as the engine core sees it (already tokenized)."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    ignore_eos: bool = False
    lora_name: str | None = None
    lora_id: int | None = None  # the adapter's int id (vLLM's lora_int_id), carried by KV events
    cache_salt: str | None = None
    n: int = 1
    arrival_time: float = 0.0  # time.monotonic() when the server accepted it; 0 = now


@dataclass(slots=True)
class RequestOutput:
    """New tokens of one request since its previous output (several when the consumer lagged)."""

    new_token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0  # prompt tokens served from cache (local + external), once known


@dataclass(slots=True)
class FinishedRequestStats:
    """Everything vLLM's per-request histograms observe when a request ends. Times in seconds."""

    finish_reason: FinishReason
    prompt_tokens: int
    generation_tokens: int
    max_tokens: int
    n: int
    ttft: float | None  # None when aborted before the first token
    inter_token_latencies: list[float] = field(default_factory=list)
    queue_time: float = 0.0
    prefill_time: float = 0.0
    decode_time: float = 0.0
    inference_time: float = 0.0
    e2e_latency: float = 0.0
    prefill_kv_computed_tokens: int = 0  # prompt tokens actually computed (not cached)


class StatsListener(Protocol):
    """What the core reports as it runs; the metrics module implements it with prometheus_client."""

    def on_iteration(self, num_prompt_tokens: int, num_generation_tokens: int) -> None:
        """One engine step produced output, as vLLM's IterationStats: ``num_generation_tokens``
        new tokens, and ``num_prompt_tokens`` from the requests that got their first token in it."""

    def on_prefix_cache_query(self, queried_tokens: int, hit_tokens: int) -> None:
        """Local (GPU) prefix-cache lookup for a newly scheduled request."""

    def on_external_cache_query(self, queried_tokens: int, hit_tokens: int) -> None:
        """LMCache lookup (CPU tier + shared remote store) for a newly scheduled request."""

    def on_prompt_tokens(self, local_compute: int, local_cache_hit: int, external_kv_transfer: int) -> None:
        """Where a request's prompt tokens came from, reported once, with its first token."""

    def on_preemption(self) -> None: ...

    def on_lora_step(self, running: Sequence[str], waiting: Sequence[str], swaps: int) -> None:
        """A step of an engine with LoRA enabled: the adapters of running and of waiting requests
        (vLLM's scheduler stats behind ``vllm:lora_requests_info``), and the GPU-slot copies it took."""

    def on_lmcache_retrieve(self, requested_tokens: int, hit_tokens: int, seconds: float) -> None:
        """LMCache loaded a newly scheduled request's tokens: ``requested_tokens`` asked of its
        tiers, ``hit_tokens`` of them came back, in ``seconds`` (wall clock at the engine's speed)."""

    def on_lmcache_store(self, stored_tokens: int, seconds: float) -> None:
        """LMCache offloaded a run of freshly computed full chunks."""

    def on_lmcache_usage(self, local_cpu_bytes: int, evicted_chunks: int) -> None:
        """Bytes of KV in LMCache's CPU tier after a step that touched it, and the chunks it has
        evicted since it started (a running total)."""

    def on_request_finished(self, stats: FinishedRequestStats) -> None: ...


EventSink = Callable[[Sequence[KVEvent]], None]


class EngineCore(Protocol):
    """The surface the server uses. Construct with a config, a StatsListener and an EventSink."""

    block_size: int
    num_gpu_blocks: int
    max_model_len: int

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, request: SimRequest) -> AsyncIterator[RequestOutput]:
        """Submit and stream outputs. Closing the iterator early aborts the request (frees blocks)."""
        ...

    def abort(self, request_id: str, reason: FinishReason = "abort") -> None:
        """End a request now, counted with ``reason``: "abort" when the client went away, "stop"
        when the server matched a stop string. A no-op for an unknown or finished request."""

    def add_lora(self, name: str) -> None:
        """An adapter was loaded (/v1/load_lora_adapter or --lora-modules): into the CPU cache."""

    def remove_lora(self, name: str) -> None:
        """An adapter was unloaded: out of the GPU slots and the CPU cache."""

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block; returns False (and does nothing) while any block is held by a
        request, as vLLM 0.24 does; emits AllBlocksCleared."""
        ...

    def clear_lmcache_cpu(self) -> int | None:
        """Empty LMCache's CPU tier (its internal API's ``DELETE /cache/clear``); the tokens
        cleared, or None when the engine runs without LMCache."""
        ...

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def num_deferred(self) -> int:
        """Waiting requests the last step skipped because their adapter exceeded max_loras."""
        ...

    @property
    def kv_cache_usage(self) -> float:
        """Used blocks over total blocks (0..1), as vllm:kv_cache_usage_perc."""
        ...
