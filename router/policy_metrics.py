"""The routing policy's own counters as ``kvstack_router_*`` series, read when Prometheus scrapes.

The cache-aware policy keeps plain integer counters (KV-event subscriber, block index, decision
stats, block-key cache); nothing on the request path touches a Prometheus object for them. Any
policy that exposes the same attributes (``subscriber.counters``, ``index.counters``, ``stats``,
``keys``) is exported the same way; a policy without them exports nothing here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvstack.common.token_cache import TokenCache
from kvstack.router.policies.base import Policy

# attribute of the counters object -> (series name without _total, help)
_SUBSCRIBER: tuple[tuple[str, str, str], ...] = (
    ("batches_applied", "kvstack_router_kv_event_batches_applied", "KV-event batches applied to the index."),
    ("gaps", "kvstack_router_kv_event_gaps", "Live KV-event batches that arrived past a missing sequence."),
    ("replays", "kvstack_router_kv_event_replays", "Replays asked of an engine's KV-event buffer."),
    ("replay_failures", "kvstack_router_kv_event_replay_failures", "Replays that failed or timed out."),
    (
        "replay_resumes",
        "kvstack_router_kv_event_replay_resumes",
        "Replays asked again where the engine's stream went quiet or skipped batches (dropped).",
    ),
    ("lost_batches", "kvstack_router_kv_event_batches_lost", "Batches neither live nor replay delivered."),
    (
        "malformed",
        "kvstack_router_kv_event_batches_malformed",
        "KV-event messages that could not be decoded.",
    ),
    ("resets", "kvstack_router_kv_event_engine_resets", "Engine restarts seen (event sequence went back)."),
)
_INDEX: tuple[tuple[str, str, str], ...] = (
    ("events_applied", "kvstack_router_kv_index_events_applied", "KV events applied to the block index."),
    ("blocks_stored", "kvstack_router_kv_index_blocks_stored", "Blocks the engines reported stored."),
    ("blocks_removed", "kvstack_router_kv_index_blocks_removed", "Blocks the engines reported removed."),
    ("clears", "kvstack_router_kv_index_clears", "Whole-engine clears (AllBlocksCleared, restarts)."),
    ("evicted_at_cap", "kvstack_router_kv_index_evicted_at_cap", "Index entries dropped at an engine's cap."),
    ("orphans_dropped", "kvstack_router_kv_index_orphans_dropped", "Stored blocks whose parent never came."),
    ("skipped_events", "kvstack_router_kv_index_skipped_events", "Events skipped: malformed or unsupported."),
)
_INDEX_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("indexed_blocks", "kvstack_router_kv_index_blocks", "Block entries held (confirmed and approximate)."),
    ("speculative_blocks", "kvstack_router_kv_index_speculative_blocks", "Entries assumed from dispatches."),
    ("capacity_blocks", "kvstack_router_kv_index_capacity_blocks", "The bound on index entries."),
)


def _counters(
    source: Any, table: Iterable[tuple[str, str, str]], make: Callable[[str, str], Any]
) -> Iterable[Metric]:
    for attr, name, doc in table:
        value = getattr(source, attr, None)
        if isinstance(value, int | float):
            family = make(name, doc)
            family.add_metric([], value)
            yield family


def _counter(name: str, doc: str) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc)


def _gauge(name: str, doc: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc)


class PolicyCollector(Collector):
    """Reads ``policy`` (and the proxy's prompt-token cache) at scrape time."""

    def __init__(self, policy: Policy, token_cache: TokenCache) -> None:
        self._policy = policy
        self._tokens = token_cache

    def collect(self) -> Iterable[Metric]:
        policy = self._policy
        subscriber = getattr(policy, "subscriber", None)
        if subscriber is not None:
            yield from _counters(getattr(subscriber, "counters", None), _SUBSCRIBER, _counter)
        index = getattr(policy, "index", None)
        if index is not None:
            yield from _counters(getattr(index, "counters", None), _INDEX, _counter)
            yield from _counters(index, _INDEX_GAUGES, _gauge)
        stats = getattr(policy, "stats", None)
        if stats is not None:
            yield from self._decision_stats(stats)
        keys = getattr(policy, "keys", None)
        if keys is not None:
            yield from self._cache("kvstack_router_block_key_cache", "Block-key cache lookups", keys)
        yield from self._cache(
            "kvstack_router_prompt_token_cache", "Prompt tokenizations served from the cache", self._tokens
        )

    def _decision_stats(self, stats: Any) -> Iterable[Metric]:
        pairs = (
            (
                "predicted_hit_tokens",
                "kvstack_router_predicted_hit_tokens",
                "Prompt tokens the policy expected the chosen engine to serve from cache (tier-weighted); "
                "compare with the engines' vllm:prefix_cache_hits_total.",
            ),
            (
                "prompt_tokens",
                "kvstack_router_prompt_tokens",
                "Prompt tokens of the requests the policy routed (the denominator of the hit prediction).",
            ),
        )
        for attr, name, doc in pairs:
            value = getattr(stats, attr, None)
            if isinstance(value, int | float):
                family = CounterMetricFamily(name, doc, labels=["policy"])
                family.add_metric([self._policy.name], value)
                yield family

    @staticmethod
    def _cache(name: str, doc: str, cache: Any) -> Iterable[Metric]:
        hits, misses = getattr(cache, "hits", None), getattr(cache, "misses", None)
        if not isinstance(hits, int) or not isinstance(misses, int):
            return
        family = CounterMetricFamily(name + "_lookups", f"{doc}, by result.", labels=["result"])
        family.add_metric(["hit"], hits)
        family.add_metric(["miss"], misses)
        yield family
