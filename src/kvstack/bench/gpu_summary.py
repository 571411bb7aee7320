"""One ``kvstack bench gpu`` case's row (pure): counter deltas, the clients' latencies, the engines'
hits, and the router's predicted hit tokens against what the engines counted."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvstack.bench import promtext, stats
from kvstack.bench.driver import RequestResult

Samples = Mapping[promtext.SampleKey, float]

ENGINE_COUNTERS = {
    "prefix_hits": "vllm:prefix_cache_hits_total",
    "prefix_queries": "vllm:prefix_cache_queries_total",
    "external_hits": "vllm:external_prefix_cache_hits_total",
    "external_queries": "vllm:external_prefix_cache_queries_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "generation_tokens": "vllm:generation_tokens_total",
    "requests": "vllm:request_success_total",
}
ROUTER_COUNTERS = {
    "predicted_hit_tokens": "kvstack_router_predicted_hit_tokens_total",
    "routed_prompt_tokens": "kvstack_router_prompt_tokens_total",
    "blocks_stored": "kvstack_router_kv_index_blocks_stored_total",
    "events_applied": "kvstack_router_kv_index_events_applied_total",
    "event_batches": "kvstack_router_kv_event_batches_applied_total",
}
INDEX_GAUGE = "kvstack_router_kv_index_blocks"
AGREEMENT_TOLERANCE = 0.10


def deltas(before: Sequence[Samples], after: Sequence[Samples], names: Mapping[str, str]) -> dict[str, float]:
    """Each counter's increase, summed over the scraped targets."""
    return {
        key: sum(promtext.delta(b, a, name) for b, a in zip(before, after, strict=True))
        for key, name in names.items()
    }


def ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def agreement(predicted: float, counted: float, tolerance: float = AGREEMENT_TOLERANCE) -> dict[str, Any]:
    """How the router's predicted hit tokens compare with the tokens the engines counted as hits."""
    rel = (predicted - counted) / counted if counted else None
    return {
        "predicted": predicted,
        "counted": counted,
        "relative_error": rel,
        "within_tolerance": rel is not None and abs(rel) <= tolerance,
    }


def summarize_case(
    results: Sequence[RequestResult],
    wall: float,
    engines: Mapping[str, float],
    router: Mapping[str, float],
    index_blocks: tuple[float, float],
) -> dict[str, Any]:
    """One case's row: client-side latencies and throughput, engine hits, the router's index."""
    ok = [r for r in results if r.ok]
    ttft = stats.summarize([r.ttft for r in ok if r.ttft is not None])
    itl = stats.summarize([x for r in ok for x in r.itl])
    counted = engines["prefix_hits"]
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "first_error": next((r.error for r in results if not r.ok), ""),
        "wall_s": wall,
        "ttft_p50": ttft["p50"],
        "ttft_p90": ttft["p90"],
        "ttft_p99": ttft["p99"],
        "itl_p50": itl["p50"],
        "itl_p90": itl["p90"],
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "output_tok_s": sum(r.completion_tokens for r in ok) / wall if wall else 0.0,
        "client_cached_tokens": sum(r.cached_tokens for r in ok),
        "engine": dict(engines),
        "prefix_hit_rate": ratio(counted, engines["prefix_queries"]),
        "external_hit_rate": ratio(engines["external_hits"], engines["external_queries"]),
        # the prompt served from any cache: the GPU's hits and LMCache's (gpu_verdict.INFO)
        "cached_rate": ratio(counted + engines["external_hits"], engines["prefix_queries"]),
        "router": dict(router),
        "index_blocks_before": index_blocks[0],
        "index_blocks_after": index_blocks[1],
        "prediction_vs_prefix_hits": agreement(router["predicted_hit_tokens"], counted),
        "prediction_vs_all_hits": agreement(
            router["predicted_hit_tokens"], counted + engines["external_hits"]
        ),
    }


def num_gpu_blocks(samples: Samples) -> int | None:
    for (name, labels), _ in samples.items():
        if name == "vllm:cache_config_info":
            value = dict(labels).get("num_gpu_blocks")
            if value and value.isdigit():
                return int(value)
    return None
