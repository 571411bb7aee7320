"""LMCache's ``lmcache:*`` families on a real simulator's ``/metrics``: reference names and labels,
values that follow a prefix stored by one simulator and retrieved by another through Redis."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from tests.engine_sim_server.conftest import MODEL, Sim, run_sim
from tests.engine_sim_server.promtext import sample
from tests.redis_server import RedisServer

from kvstack.common.waits import wait_until
from kvstack.engine.sim.config import KV_BYTES_PER_TOKEN

PROMPT = [300 + (i * 37) % 9000 for i in range(1024)]  # 4 LMCache chunks of 256
LABELS = {"model_name": "kvstack/sim-8b", "served_model_name": MODEL, "worker_id": "0", "role": "worker"}


def lmcache_samples(text: str) -> dict[str, dict[str, str]]:
    return {
        s.name: dict(s.labels)
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("lmcache:")
    }


def complete(sim: Sim) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "ignore_eos": True}
    assert httpx.post(f"{sim.base_url}/completions", json=body, timeout=30).status_code == 200


def test_no_lmcache_series_without_the_connector(sim: Sim) -> None:
    assert lmcache_samples(sim.metrics()) == {}


def test_retrieve_and_store_counters_follow_a_prefix_shared_through_redis(
    redis_server: RedisServer, reference_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONHASHSEED", "0")  # LMCache shares chunks only between equal seeds
    args = ("--speed", "50", "--lmcache", "--lmcache-remote-url", redis_server.url)
    with run_sim(*args) as a, run_sim(*args) as b:
        complete(a)
        store = redis.Redis.from_url(redis_server.url)
        try:
            wait_until(lambda: store.dbsize() >= 4, "the first simulator's chunks in Redis", timeout=10)
        finally:
            store.close()
        complete(b)
        text_a, text_b = a.metrics(), b.metrics()

    names = {line.strip() for line in (reference_dir / "exporter-metric-names.txt").read_text().splitlines()}
    ours = lmcache_samples(text_b)
    # prometheus_client's _created samples come with every counter and histogram, as in vLLM's own
    # scrape; the reference lists the samples a query reads
    assert {n for n in ours if not n.endswith("_created")} <= names, set(ours) - names
    for labels in ours.values():
        assert {k: v for k, v in labels.items() if k != "le"} == LABELS

    def value(text: str, name: str) -> float:
        return sample(text, name, **LABELS)

    # The first simulator computed the prompt and stored its 4 full chunks.
    assert value(text_a, "lmcache:num_stored_tokens_total") == 1024
    assert value(text_a, "lmcache:num_store_requests_total") >= 1
    assert value(text_a, "lmcache:time_to_store_count") == value(text_a, "lmcache:num_store_requests_total")
    assert value(text_a, "lmcache:num_requested_tokens_total") == 0
    assert value(text_a, "lmcache:local_cache_usage") == 1024 * KV_BYTES_PER_TOKEN
    # The second found them in Redis: all but the last token asked for and retrieved.
    assert value(text_b, "lmcache:num_retrieve_requests_total") == 1
    assert value(text_b, "lmcache:num_requested_tokens_total") == 1023
    assert value(text_b, "lmcache:num_hit_tokens_total") == 1023
    assert value(text_b, "lmcache:time_to_retrieve_count") == 1
    assert value(text_b, "lmcache:time_to_retrieve_sum") > 0
    assert value(text_b, "lmcache:num_stored_tokens_total") == 0
    assert value(text_b, "lmcache:local_cache_usage") == 1024 * KV_BYTES_PER_TOKEN
    # Both CPU tiers hold the prompt with room to spare: nothing evicted.
    assert value(text_a, "lmcache:local_cpu_evict_keys_count_total") == 0
    assert value(text_b, "lmcache:local_cpu_evict_keys_count_total") == 0


def test_eviction_counters_follow_a_cpu_tier_too_small_for_the_prompt(tmp_path: Path) -> None:
    """A CPU tier of two chunks stores the prompt's four and evicts the first two: LMCache counts
    one eviction per chunk allocation that found the tier full, and the model never fails one (it
    pins nothing), so the failure counter the alert reads is there at 0."""
    chunk_bytes = 256 * KV_BYTES_PER_TOKEN
    config = tmp_path / "sim.yaml"
    config.write_text(f"lmcache:\n  local_cpu_gb: {2.5 * chunk_bytes / 1e9}\n")
    with run_sim("--speed", "50", "--lmcache", "--config", str(config)) as sim:
        text = sim.metrics()
        assert sample(text, "lmcache:local_cpu_evict_failed_count_total", **LABELS) == 0
        assert sample(text, "lmcache:local_cpu_evict_count_total", **LABELS) == 0
        complete(sim)
        text = sim.metrics()
    assert sample(text, "lmcache:num_stored_tokens_total", **LABELS) == 1024
    assert sample(text, "lmcache:local_cache_usage", **LABELS) == 2 * chunk_bytes
    assert sample(text, "lmcache:local_cpu_evict_count_total", **LABELS) == 2
    assert sample(text, "lmcache:local_cpu_evict_keys_count_total", **LABELS) == 2
    assert sample(text, "lmcache:local_cpu_evict_failed_count_total", **LABELS) == 0
