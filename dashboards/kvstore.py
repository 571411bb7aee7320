"""LMCache and Redis panels: the KV tiers behind the engines' GPU cache.

LMCache 0.5.3 registers its ``lmcache:*`` series in the vLLM process, so they come with the engine
scrape (``pod``, ``namespace``) and carry LMCache's own labels: ``model_name`` is the model path and
``served_model_name`` the name vLLM labels its series with, so the ``$model`` filter goes on the latter.
Redis (the chart's shared store) is read through redis_exporter beside it (``redis_*``), selected by
the ``kvstack_component`` target label the chart's PodMonitor sets (never by job name, which follows
the release name). The names are checked against ``tests/reference/exporter-metric-names.txt``.
"""

from __future__ import annotations

from kvstack.dashboards.panels import Panel, Query, Row
from kvstack.dashboards.promql import divide, quantile, selector, sum_rate

LMCACHE_SEL = 'served_model_name=~"$model", namespace=~"$namespace", pod=~"$pod"'
REDIS_SEL = 'kvstack_component="redis", namespace=~"$namespace"'
HIT_TOKENS = "lmcache:num_hit_tokens_total"
REQUESTED_TOKENS = "lmcache:num_requested_tokens_total"
STORED_TOKENS = "lmcache:num_stored_tokens_total"
TIME_TO_RETRIEVE = "lmcache:time_to_retrieve"
TIME_TO_STORE = "lmcache:time_to_store"
LOCAL_CPU_BYTES = "lmcache:local_cache_usage"
EVICTED_CHUNKS = "lmcache:local_cpu_evict_keys_count_total"
FAILED_EVICTIONS = "lmcache:local_cpu_evict_failed_count_total"


def _lmcache_latency() -> Panel:
    return Panel(
        "LMCache retrieve and store latency",
        [
            Query(quantile(q, h, "pod", LMCACHE_SEL), f"{what} p{round(q * 100)} {{{{pod}}}}")
            for what, h in (("retrieve", TIME_TO_RETRIEVE), ("store", TIME_TO_STORE))
            for q in (0.5, 0.99)
        ],
        unit="s",
        description="p50/p99 time LMCache takes to load a request's KV into the GPU "
        "(lmcache:time_to_retrieve) and to save it to its tiers (lmcache:time_to_store); a slow "
        "retrieve eats the TTFT a hit saves.",
    )


def lmcache_row() -> Row:
    return Row(
        "LMCache",
        [
            Panel(
                "LMCache token hit rate",
                [
                    Query(
                        divide(
                            sum_rate(HIT_TOKENS, "pod", LMCACHE_SEL),
                            sum_rate(REQUESTED_TOKENS, "pod", LMCACHE_SEL),
                        ),
                        "{{pod}}",
                    )
                ],
                unit="percentunit",
                max=1,
                description="Tokens LMCache found in its CPU tier or the shared store over tokens vLLM "
                "asked it for (lmcache:num_hit_tokens_total / lmcache:num_requested_tokens_total).",
            ),
            Panel(
                "LMCache retrieve and store throughput",
                [
                    Query(sum_rate(HIT_TOKENS, "pod", LMCACHE_SEL), "retrieved {{pod}}"),
                    Query(sum_rate(STORED_TOKENS, "pod", LMCACHE_SEL), "stored {{pod}}"),
                ],
                unit="short",
                description="Tokens of KV per second LMCache loaded into the GPU (hits) and saved from it "
                "(lmcache:num_hit_tokens_total, lmcache:num_stored_tokens_total).",
            ),
            _lmcache_latency(),
            Panel(
                "LMCache local CPU tier",
                [Query(f"sum by (pod) ({selector(LOCAL_CPU_BYTES, LMCACHE_SEL)})", "{{pod}}")],
                unit="bytes",
                description="Bytes of KV held in each pod's CPU tier (lmcache:local_cache_usage); it stops "
                "at lmcache.maxLocalCpuSizeGb, which the pod's memory request must cover.",
            ),
            Panel(
                "LMCache CPU tier evictions/s",
                [
                    Query(sum_rate(EVICTED_CHUNKS, "pod", LMCACHE_SEL), "evicted {{pod}}"),
                    Query(sum_rate(FAILED_EVICTIONS, "pod", LMCACHE_SEL), "failed {{pod}}"),
                ],
                unit="short",
                description="Chunks LMCache evicted from a full CPU tier to store new ones "
                "(lmcache:local_cpu_evict_keys_count_total; normal once the tier is full), and "
                "evictions that found nothing evictable (lmcache:local_cpu_evict_failed_count_total): "
                "every chunk pinned or held by a queued Redis write, so stores are cut short "
                "(alert KvstackLMCacheEvictionFailing).",
            ),
        ],
    )


def redis_row() -> Row:
    used = f"sum by (pod) ({selector('redis_memory_used_bytes', REDIS_SEL)})"
    limit = f"max by (pod) ({selector('redis_memory_max_bytes', REDIS_SEL)})"
    hits = sum_rate("redis_keyspace_hits_total", "pod", REDIS_SEL)
    misses = sum_rate("redis_keyspace_misses_total", "pod", REDIS_SEL)
    return Row(
        "Redis (LMCache's shared store)",
        [
            Panel(
                "Redis memory used",
                [Query(used, "{{pod}}")],
                unit="bytes",
                description="Memory Redis uses for LMCache's KV chunks (redis_memory_used_bytes); how close "
                "that is to the bound is on the next panel, so a small store stays readable.",
            ),
            Panel(
                "Redis memory used of maxmemory",
                [Query(divide(used, limit), "{{pod}}")],
                unit="percentunit",
                max=1,
                thresholds=((0.9, "orange"),),
                description="Memory used over maxmemory (redis_memory_used_bytes / redis_memory_max_bytes; "
                "empty when maxmemory is 0, i.e. unbounded): near 100% Redis evicts KV chunks and "
                "cross-engine hits drop.",
            ),
            Panel(
                "Redis evictions/s",
                [Query(sum_rate("redis_evicted_keys_total", "pod", REDIS_SEL), "{{pod}}")],
                unit="short",
                description="Keys (KV chunks) Redis dropped to stay under maxmemory "
                "(redis_evicted_keys_total): steady evictions mean the store is too small for the "
                "shared working set.",
            ),
            Panel(
                "Redis keyspace hit ratio",
                [Query(divide(hits, f"({hits} + {misses})"), "{{pod}}")],
                unit="percentunit",
                max=1,
                description="Lookups that found their key over all lookups (redis_keyspace_hits_total / "
                "(hits + redis_keyspace_misses_total)): LMCache's remote hit rate as Redis sees it.",
            ),
        ],
    )
