"""The router dashboard's cache-aware routing row: predicted against actual cache hits, the health of
the KV-event subscriptions, and the size and fill of the router's block index.

Per-router series carry ``pod`` (one router replica each) and ``policy``, not ``model_name``, so they
filter on namespace alone; the engines' cached-token counters filter like every per-request series.
"""

from __future__ import annotations

from kvstack.dashboards.panels import Panel, Query, Row
from kvstack.dashboards.promql import NS_SEL, ROUTER_SEL, divide, selector, sum_rate


def _kv_event_rate(series: str, legend: str) -> Query:
    return Query(sum_rate(f"kvstack_router_kv_event_{series}_total", "pod", NS_SEL), f"{legend} {{{{pod}}}}")


def cache_aware_row() -> Row:
    """The cache-aware policy's own view: predicted hits, KV-event stream health, index size."""
    return Row(
        "Cache-aware routing",
        [
            Panel(
                "Predicted vs actual cache hits",
                [
                    Query(
                        divide(
                            sum_rate("kvstack_router_predicted_hit_tokens_total", "policy", NS_SEL),
                            sum_rate("kvstack_router_prompt_tokens_total", "policy", NS_SEL),
                        ),
                        "predicted by {{policy}}",
                    ),
                    Query(
                        divide(
                            sum_rate("vllm:prompt_tokens_cached_total", "", ROUTER_SEL),
                            sum_rate("vllm:prompt_tokens_total", "", ROUTER_SEL),
                        ),
                        "cached at the engines",
                    ),
                ],
                unit="percentunit",
                max=1,
                description="Share of prompt tokens the policy expected the chosen engine to hold "
                "(kvstack_router_predicted_hit_tokens_total / kvstack_router_prompt_tokens_total) against "
                "the share the engines really served from cache: a gap means a stale block index.",
            ),
            Panel(
                "KV-event stream problems/s",
                [
                    _kv_event_rate("gaps", "gaps"),
                    _kv_event_rate("batches_lost", "lost"),
                    _kv_event_rate("replay_failures", "replay failures"),
                    _kv_event_rate("batches_malformed", "malformed"),
                    _kv_event_rate("engine_resets", "engine resets"),
                ],
                unit="short",
                description="Sequence gaps, batches lost for good, failed replays, undecodable messages and "
                "engine restarts on the routers' KV-event subscriptions (kvstack_router_kv_event_*).",
            ),
            Panel(
                "KV index size",
                [
                    Query(
                        f"sum by (pod) ({selector('kvstack_router_kv_index_blocks', NS_SEL)})",
                        "blocks {{pod}}",
                    ),
                    Query(
                        f"sum by (pod) ({selector('kvstack_router_kv_index_speculative_blocks', NS_SEL)})",
                        "speculative {{pod}}",
                    ),
                ],
                unit="short",
                description="Block entries each router's index holds, and those it assumed from its own "
                "dispatches before the engine's KV event confirmed them (kvstack_router_kv_index_blocks, "
                "kvstack_router_kv_index_speculative_blocks). The bound is on the next panel, so a small "
                "index stays readable next to a large capacity.",
            ),
            Panel(
                "KV index fill",
                [
                    Query(
                        divide(
                            f"sum by (pod) ({selector('kvstack_router_kv_index_blocks', NS_SEL)})",
                            f"max by (pod) ({selector('kvstack_router_kv_index_capacity_blocks', NS_SEL)})",
                        ),
                        "{{pod}}",
                    ),
                ],
                unit="percentunit",
                max=1,
                thresholds=((0.9, "orange"),),
                description="Index entries over the index's bound (kvstack_router_kv_index_blocks / "
                "kvstack_router_kv_index_capacity_blocks): near 100% the router evicts entries and its "
                "predicted hits go stale.",
            ),
            Panel(
                "Prompt tokenization cache hit rate",
                [
                    Query(
                        divide(
                            sum_rate(
                                "kvstack_router_prompt_token_cache_lookups_total",
                                "pod",
                                NS_SEL + ', result="hit"',
                            ),
                            sum_rate("kvstack_router_prompt_token_cache_lookups_total", "pod", NS_SEL),
                        ),
                        "{{pod}}",
                    )
                ],
                unit="percentunit",
                max=1,
                description="Prompts whose tokens came from the router's cache instead of the tokenizer "
                "(kvstack_router_prompt_token_cache_lookups_total).",
            ),
        ],
    )
