"""Engine panels: what vLLM 0.24 pods report about latency, queues, KV cache and LMCache.

The same rows serve the Overview (one series per model) and the Engines dashboard (one per pod,
filtered by ``$pod``); only the grouping, the legend and the selector differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstack.dashboards.panels import Panel, Query, Row
from kvstack.dashboards.promql import ENGINE_SEL, divide, mean, quantile, ratio, selector, sum_rate

TTFT = "vllm:time_to_first_token_seconds"
ITL = "vllm:inter_token_latency_seconds"
E2E = "vllm:e2e_request_latency_seconds"
QUEUE = "vllm:request_queue_time_seconds"
PREFILL = "vllm:request_prefill_time_seconds"
DECODE = "vllm:request_decode_time_seconds"
POD_SEL = ENGINE_SEL + ', pod=~"$pod"'
QUANTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True, slots=True)
class Scope:
    """How engine series are grouped and filtered on one dashboard."""

    by: str
    legend: str
    sel: str


PER_MODEL = Scope("model_name", "{{model_name}}", ENGINE_SEL)
PER_POD = Scope("model_name, pod", "{{pod}}", POD_SEL)


def latency(title: str, histogram: str, s: Scope, quantiles: tuple[float, ...] = QUANTILES) -> Panel:
    return Panel(
        title,
        [Query(quantile(q, histogram, s.by, s.sel), f"p{round(q * 100)} {s.legend}") for q in quantiles],
        unit="s",
        description=f"p{'/p'.join(str(round(q * 100)) for q in quantiles)} of {histogram} "
        "(engine-side), over the sum of bucket rates.",
    )


def latency_row(s: Scope) -> Row:
    # p50/p90/p99 on both scopes: a tail problem (p99) and a typical-request one (p50) look alike at p90.
    return Row(
        "Engine latency",
        [
            latency("Time to first token (engine)", TTFT, s),
            latency("Inter-token latency (engine)", ITL, s),
            latency("End-to-end request latency (engine)", E2E, s),
            Panel(
                "Mean time per phase",
                [
                    Query(mean(h, s.by, s.sel), f"{phase} {s.legend}")
                    for phase, h in (("queue", QUEUE), ("prefill", PREFILL), ("decode", DECODE))
                ],
                unit="s",
                stack=True,
                description="Windowed means of vllm:request_{queue,prefill,decode}_time_seconds: "
                "a growing queue share means too few replicas.",
            ),
        ],
    )


def throughput_row(s: Scope) -> Row:
    return Row(
        "Throughput and queues",
        [
            Panel(
                "Output tokens/s",
                [Query(sum_rate("vllm:generation_tokens_total", s.by, s.sel), s.legend)],
                unit="short",
                stack=True,
                description="Generated tokens per second (vllm:generation_tokens_total).",
            ),
            Panel(
                "Prompt tokens/s by source",
                [
                    Query(
                        sum_rate("vllm:prompt_tokens_by_source_total", f"{s.by}, source", s.sel),
                        f"{s.legend} {{{{source}}}}",
                    )
                ],
                unit="short",
                stack=True,
                description="Prompt tokens computed locally, hit in the GPU prefix cache, or transferred "
                "from LMCache (vllm:prompt_tokens_by_source_total).",
            ),
            Panel(
                "Requests waiting",
                [Query(f"sum by ({s.by}) ({selector('vllm:num_requests_waiting', s.sel)})", s.legend)],
                unit="short",
                description="Requests queued in the engines' schedulers (vllm:num_requests_waiting): "
                "the saturation signal the autoscaler follows.",
            ),
            Panel(
                "Requests running",
                [Query(f"sum by ({s.by}) ({selector('vllm:num_requests_running', s.sel)})", s.legend)],
                unit="short",
                description="Requests in the engines' running batches (vllm:num_requests_running).",
            ),
            Panel(
                "Finished requests/s by reason",
                [
                    Query(
                        sum_rate("vllm:request_success_total", f"{s.by}, finished_reason", s.sel),
                        f"{s.legend} {{{{finished_reason}}}}",
                    )
                ],
                unit="reqps",
                stack=True,
                description="vllm:request_success_total by finished_reason: stop, length, abort "
                "(client gone), error.",
            ),
            Panel(
                "Preemptions/s",
                [Query(sum_rate("vllm:num_preemptions_total", s.by, s.sel), s.legend)],
                unit="short",
                description="Requests preempted because the KV cache ran out (vllm:num_preemptions_total).",
            ),
        ],
    )


def cache_row(s: Scope) -> Row:
    return Row(
        "KV cache and LMCache",
        [
            Panel(
                "KV cache usage",
                [Query(f"max by ({s.by}) ({selector('vllm:kv_cache_usage_perc', s.sel)})", s.legend)],
                unit="percentunit",
                max=1,
                thresholds=((0.9, "orange"), (0.98, "red")),
                description="Used KV blocks over total, the most loaded engine (vllm:kv_cache_usage_perc).",
            ),
            Panel(
                "Prefix cache hit rate (GPU)",
                [
                    Query(
                        ratio("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", s.by, s.sel),
                        s.legend,
                    )
                ],
                unit="percentunit",
                max=1,
                description="Prompt tokens served from the GPU prefix cache over tokens queried "
                "(vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total).",
            ),
            Panel(
                "LMCache hit rate (external)",
                [
                    Query(
                        ratio(
                            "vllm:external_prefix_cache_hits_total",
                            "vllm:external_prefix_cache_queries_total",
                            s.by,
                            s.sel,
                        ),
                        s.legend,
                    )
                ],
                unit="percentunit",
                max=1,
                description="Prompt tokens found in LMCache (CPU tier or the shared Redis store) over "
                "tokens queried there (vllm:external_prefix_cache_*).",
            ),
            Panel(
                "Cached share of prompt tokens",
                [
                    Query(
                        divide(
                            sum_rate("vllm:prompt_tokens_cached_total", s.by, s.sel),
                            sum_rate("vllm:prompt_tokens_total", s.by, s.sel),
                        ),
                        s.legend,
                    )
                ],
                unit="percentunit",
                max=1,
                description="Local + external cached prompt tokens over all prompt tokens "
                "(vllm:prompt_tokens_cached_total / vllm:prompt_tokens_total).",
            ),
        ],
    )


def engine_rows(s: Scope) -> list[Row]:
    """Rows for the Overview (``PER_MODEL``) or the Engines dashboard (``PER_POD``)."""
    return [latency_row(s), throughput_row(s), cache_row(s)]
