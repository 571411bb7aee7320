"""LMCache 0.5.3's own ``lmcache:*`` families on the simulator's ``/metrics`` (with ``--lmcache``).

LMCache registers these in the vLLM process (``lmcache/observability.py``), so a real engine's
scrape carries them beside ``vllm:*`` and the dashboards' LMCache row reads them from there. The
simulator exports the families its LMCache model has real counts for, with LMCache's names, types,
buckets and label names (``tests/reference/exporter-metric-names.txt``):

- retrieves: ``num_retrieve_requests``, ``num_requested_tokens`` (tokens asked of the CPU tier and
  Redis, a failed remote load included), ``num_hit_tokens`` (tokens that came back) and
  ``time_to_retrieve`` (the latency model's load time of the request);
- stores: ``num_store_requests``, ``num_stored_tokens`` (full chunks offloaded) and
  ``time_to_store`` (the latency model's store time of the run);
- ``local_cache_usage``: bytes of KV the CPU tier holds;
- evictions: ``local_cpu_evict_count`` (allocations that found the CPU tier full and evicted; LMCache
  allocates a chunk at a time, so one a chunk), ``local_cpu_evict_keys_count`` (chunks evicted) and
  ``local_cpu_evict_failed_count``, which stays 0: LMCache fails an eviction when every chunk is
  pinned by a lookup or held by a queued Redis put, and the model pins nothing (the alert on it,
  ``KvstackLMCacheEvictionFailing``, is tested with promtool series).

Labels: ``model_name`` is the model (``--model``, the path on a real engine), ``served_model_name``
the name vLLM labels its own series with, ``worker_id`` "0" (one worker: the simulator has no
tensor parallelism) and ``role`` "worker" (retrieve and store run in the worker's connector).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# LMCache 0.5.3's buckets for time_to_retrieve and time_to_store (seconds).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
LABEL_NAMES = ("model_name", "served_model_name", "worker_id", "role")


class LMCacheMetrics:
    """The ``lmcache:*`` families in ``registry``, moved by the connector's retrieves and stores."""

    def __init__(self, registry: CollectorRegistry, model: str, served_model_name: str) -> None:
        labels = {
            "model_name": model,
            "served_model_name": served_model_name,
            "worker_id": "0",
            "role": "worker",
        }

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"lmcache:{name}", doc, LABEL_NAMES, registry=registry).labels(**labels)

        def histogram(name: str, doc: str) -> Histogram:
            family = Histogram(
                f"lmcache:{name}", doc, LABEL_NAMES, buckets=LATENCY_BUCKETS, registry=registry
            )
            return family.labels(**labels)

        self.retrieve_requests = counter("num_retrieve_requests", "Total number of retrieve requests")
        self.requested_tokens = counter("num_requested_tokens", "Total number of tokens requested")
        self.hit_tokens = counter("num_hit_tokens", "Total number of tokens hit")
        self.store_requests = counter("num_store_requests", "Total number of store requests")
        self.stored_tokens = counter("num_stored_tokens", "Total number of tokens stored")
        self.time_to_retrieve = histogram("time_to_retrieve", "Time to retrieve from lmcache (seconds)")
        self.time_to_store = histogram("time_to_store", "Time to store to lmcache (seconds)")
        usage = Gauge(
            "lmcache:local_cache_usage",
            "Local cache usage (bytes) of lmcache",
            LABEL_NAMES,
            registry=registry,
            multiprocess_mode="sum",
        )
        self.local_cache_usage = usage.labels(**labels)
        self.local_cache_usage.set(0.0)
        self.evict_count = counter("local_cpu_evict_count", "Total number of evict in local cpu backend")
        self.evict_keys = counter(
            "local_cpu_evict_keys_count", "Total number of evict keys in local cpu backend"
        )
        counter("local_cpu_evict_failed_count", "Total number of failed eviction in local cpu backend")
        self._evicted = 0  # the CPU tier's evictions already counted

    def on_retrieve(self, requested_tokens: int, hit_tokens: int, seconds: float) -> None:
        self.retrieve_requests.inc()
        self.requested_tokens.inc(requested_tokens)
        self.hit_tokens.inc(hit_tokens)
        self.time_to_retrieve.observe(seconds)

    def on_store(self, stored_tokens: int, seconds: float) -> None:
        self.store_requests.inc()
        self.stored_tokens.inc(stored_tokens)
        self.time_to_store.observe(seconds)

    def on_usage(self, local_cpu_bytes: int, evicted_chunks: int) -> None:
        """The CPU tier now: bytes held, and its evictions since it started (a running total)."""
        self.local_cache_usage.set(float(local_cpu_bytes))
        new = evicted_chunks - self._evicted
        if new > 0:
            self.evict_count.inc(new)
            self.evict_keys.inc(new)
            self._evicted = evicted_chunks
