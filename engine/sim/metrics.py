"""vLLM 0.24's ``/metrics`` for the simulator: every ``vllm:`` family of the reference scrape.

Names, types, label names and buckets follow ``tests/reference/vllm-0.24-metrics.txt``. Counters and
histograms are fed by the core through :class:`SimMetrics` (a ``StatsListener``); gauges are read from
the core at scrape time. Each instance owns its registry, so several simulators can share a process.
The families' buckets and label values are in :mod:`kvstack.engine.sim.metric_shapes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from kvstack.engine.sim.lmcache_metrics import LMCacheMetrics
from kvstack.engine.sim.metric_shapes import (
    FINISH_REASONS,
    ITERATION_BUCKETS,
    ITL_BUCKETS,
    N_BUCKETS,
    PHASE_BUCKETS,
    PROMPT_SOURCES,
    TTFT_BUCKETS,
    CacheInfo,
    buckets_1_2_5,
)
from kvstack.engine.sim.types import FinishedRequestStats

CONTENT_TYPE = CONTENT_TYPE_LATEST


class EngineGauges(Protocol):
    """What the gauges read at scrape time (``EngineCore`` satisfies it)."""

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def kv_cache_usage(self) -> float: ...

    @property
    def num_deferred(self) -> int:
        """Waiting requests held back by a transient constraint (the LoRA budget: max_loras)."""
        ...


class SimMetrics:
    """The registry plus the ``StatsListener`` callbacks that move it."""

    def __init__(self, model_name: str, cache: CacheInfo) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        base = {"model_name": model_name, "engine": "0"}
        names = list(base)
        reg = self.registry

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"vllm:{name}", doc, names, registry=reg)

        # Each histogram has one child; binding it once lets observe() skip the label lookup.
        def histogram(name: str, doc: str, buckets: tuple[float, ...] | list[float]) -> Histogram:
            return Histogram(f"vllm:{name}", doc, names, buckets=buckets, registry=reg).labels(**base)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"vllm:{name}", doc, [*names, *extra], registry=reg, multiprocess_mode="all")

        mfu = "(for Model Flops Utilization calculations)."
        for name, doc in (
            ("estimated_flops_per_gpu", "Estimated number of floating point operations per GPU"),
            ("estimated_read_bytes_per_gpu", "Estimated number of bytes read from memory per GPU"),
            ("estimated_write_bytes_per_gpu", "Estimated number of bytes written to memory per GPU"),
        ):
            counter(name, f"{doc} {mfu}").labels(**base)
        self._running = gauge("num_requests_running", "Number of requests in model execution batches.")
        self._waiting = gauge("num_requests_waiting", "Number of requests waiting to be processed.")
        self._waiting_by_reason = gauge(
            "num_requests_waiting_by_reason",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling "
            "capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked "
            "status). Sum of all reasons equals vllm:num_requests_waiting.",
            ("reason",),
        )
        sleep = gauge(
            "engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
            "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
            ("sleep_state",),
        )
        for state, value in (("awake", 1.0), ("weights_offloaded", 0.0), ("discard_all", 0.0)):
            sleep.labels(**base, sleep_state=state).set(value)
        self._usage = gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        q = "in terms of number of queried tokens."
        h = "in terms of number of cached tokens."
        ext = "External prefix cache {} from KV connector cross-instance cache sharing, {}"
        self.prefix_queries = counter("prefix_cache_queries", f"Prefix cache queries, {q}").labels(**base)
        self.prefix_hits = counter("prefix_cache_hits", f"Prefix cache hits, {h}").labels(**base)
        self.ext_queries = counter("external_prefix_cache_queries", ext.format("queries", q)).labels(**base)
        self.ext_hits = counter("external_prefix_cache_hits", ext.format("hits", h)).labels(**base)
        counter("mm_cache_queries", "Multi-modal cache queries, in terms of number of queried items.").labels(
            **base
        )
        counter("mm_cache_hits", "Multi-modal cache hits, in terms of number of cached items.").labels(**base)
        preempt = counter("num_preemptions", "Cumulative number of preemption from the engine.")
        self.preemptions = preempt.labels(**base)
        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.").labels(**base)
        by_source = Counter(
            "vllm:prompt_tokens_by_source",
            "Number of prompt tokens by source.",
            [*names, "source"],
            registry=reg,
        )
        self.by_source = [by_source.labels(**base, source=s) for s in PROMPT_SOURCES]
        self.prompt_cached = counter(
            "prompt_tokens_cached", "Number of cached prompt tokens (local + external)."
        ).labels(**base)
        self.generation_tokens = counter(
            "generation_tokens", "Number of generation tokens processed."
        ).labels(**base)
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*names, "finished_reason"],
            registry=reg,
        )
        self.success = {r: success.labels(**base, finished_reason=r) for r in FINISH_REASONS}
        tok = buckets_1_2_5(cache.max_model_len)
        self.h_prompt = histogram("request_prompt_tokens", "Number of prefill tokens processed.", tok)
        self.h_gen = histogram("request_generation_tokens", "Number of generation tokens processed.", tok)
        self.h_iter = histogram(
            "iteration_tokens_total", "Histogram of number of tokens per engine_step.", ITERATION_BUCKETS
        )
        self.h_max_gen = histogram(
            "request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            tok,
        )
        self.h_n = histogram("request_params_n", "Histogram of the n request parameter.", N_BUCKETS)
        self.h_max_tokens = histogram(
            "request_params_max_tokens", "Histogram of the max_tokens request parameter.", tok
        )
        self.h_ttft = histogram(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.h_itl = histogram(
            "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self.h_tpot = histogram(
            "request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            ITL_BUCKETS,
        )
        self.h_e2e = histogram(
            "e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", PHASE_BUCKETS
        )
        self.h_queue = histogram(
            "request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            PHASE_BUCKETS,
        )
        self.h_inference = histogram(
            "request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            PHASE_BUCKETS,
        )
        self.h_prefill = histogram(
            "request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            PHASE_BUCKETS,
        )
        self.h_decode = histogram(
            "request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            PHASE_BUCKETS,
        )
        self.h_kv_computed = histogram(
            "request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
            tok,
        )
        # vLLM labels this one with the engine alone: no model_name.
        info_labels = {"engine": "0", **cache.labels()}
        info = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            list(info_labels),
            registry=reg,
        )
        info.labels(**info_labels).set(1.0)
        self._base = base
        self._lora_info: Gauge | None = None
        self._lora_swaps: Counter | None = None
        self._max_lora = ""
        self._lmcache: LMCacheMetrics | None = None

    def enable_lora(self, max_loras: int) -> None:
        """Export ``vllm:lora_requests_info`` (vLLM 0.24 does only with --enable-lora) and the
        simulator's own count of adapter swaps (vLLM exports none)."""
        self._max_lora = str(max_loras)
        # vLLM labels it with these three alone (no model_name, no engine); every step sets the
        # series of its adapter sets to the current time, and earlier series stay: read the newest.
        self._lora_info = Gauge(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            registry=self.registry,
            multiprocess_mode="sum",
        )
        self._lora_swaps = Counter(
            "kvstack_sim_lora_swaps",
            "Simulator only: LoRA adapters copied from CPU into a GPU slot (max_loras slots) for a step.",
            list(self._base),
            registry=self.registry,
        )
        self._lora_swaps.labels(**self._base)

    def enable_lmcache(self, model: str) -> None:
        """Export LMCache's own ``lmcache:*`` families, as a vLLM process with the connector does."""
        self._lmcache = LMCacheMetrics(self.registry, model, self._base["model_name"])

    def bind_engine(self, engine: EngineGauges) -> None:
        """Read the gauges from ``engine`` at every scrape."""
        base = self._base
        self._running.labels(**base).set_function(lambda: float(engine.num_running))
        self._waiting.labels(**base).set_function(lambda: float(engine.num_waiting))

        def deferred() -> float:
            return float(min(engine.num_deferred, engine.num_waiting))

        self._waiting_by_reason.labels(**base, reason="capacity").set_function(
            lambda: float(engine.num_waiting) - deferred()
        )
        self._waiting_by_reason.labels(**base, reason="deferred").set_function(deferred)
        self._usage.labels(**base).set_function(lambda: float(engine.kv_cache_usage))

    def render(self, names: list[str] | None = None) -> bytes:
        """The exposition text; with ``names``, only those samples (prometheus_client's ``name[]``)."""
        return generate_latest(self.registry if names is None else self.registry.restricted_registry(names))

    # --- StatsListener ---------------------------------------------------------------------------

    def on_iteration(self, num_prompt_tokens: int, num_generation_tokens: int) -> None:
        self.generation_tokens.inc(num_generation_tokens)
        self.h_iter.observe(num_prompt_tokens + num_generation_tokens)

    def on_prefix_cache_query(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries.inc(queried_tokens)
        self.prefix_hits.inc(hit_tokens)

    def on_external_cache_query(self, queried_tokens: int, hit_tokens: int) -> None:
        self.ext_queries.inc(queried_tokens)
        self.ext_hits.inc(hit_tokens)

    def on_prompt_tokens(self, local_compute: int, local_cache_hit: int, external_kv_transfer: int) -> None:
        for child, value in zip(
            self.by_source, (local_compute, local_cache_hit, external_kv_transfer), strict=True
        ):
            child.inc(value)
        self.prompt_tokens.inc(local_compute + local_cache_hit + external_kv_transfer)
        self.prompt_cached.inc(local_cache_hit + external_kv_transfer)

    def on_preemption(self) -> None:
        self.preemptions.inc()

    def on_lora_step(self, running: Sequence[str], waiting: Sequence[str], swaps: int) -> None:
        if self._lora_info is None or self._lora_swaps is None:
            return
        self._lora_info.labels(
            max_lora=self._max_lora,
            waiting_lora_adapters=",".join(waiting),
            running_lora_adapters=",".join(running),
        ).set_to_current_time()
        if swaps:
            self._lora_swaps.labels(**self._base).inc(swaps)

    def on_lmcache_retrieve(self, requested_tokens: int, hit_tokens: int, seconds: float) -> None:
        if self._lmcache is not None:
            self._lmcache.on_retrieve(requested_tokens, hit_tokens, seconds)

    def on_lmcache_store(self, stored_tokens: int, seconds: float) -> None:
        if self._lmcache is not None:
            self._lmcache.on_store(stored_tokens, seconds)

    def on_lmcache_usage(self, local_cpu_bytes: int, evicted_chunks: int) -> None:
        if self._lmcache is not None:
            self._lmcache.on_usage(local_cpu_bytes, evicted_chunks)

    def on_request_finished(self, stats: FinishedRequestStats) -> None:
        self.success[stats.finish_reason].inc()
        self.h_prompt.observe(stats.prompt_tokens)
        self.h_gen.observe(stats.generation_tokens)
        self.h_max_gen.observe(stats.generation_tokens)  # the max over n sequences; n is 1
        self.h_n.observe(stats.n)
        self.h_max_tokens.observe(stats.max_tokens)
        if stats.ttft is not None:
            self.h_ttft.observe(stats.ttft)
        observe_itl = self.h_itl.observe
        for gap in stats.inter_token_latencies:
            observe_itl(gap)
        if stats.generation_tokens > 1:
            self.h_tpot.observe(stats.decode_time / (stats.generation_tokens - 1))
        self.h_e2e.observe(stats.e2e_latency)
        self.h_queue.observe(stats.queue_time)
        self.h_inference.observe(stats.inference_time)
        self.h_prefill.observe(stats.prefill_time)
        self.h_decode.observe(stats.decode_time)
        self.h_kv_computed.observe(stats.prefill_kv_computed_tokens)
