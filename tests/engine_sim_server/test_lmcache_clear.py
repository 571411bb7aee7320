"""LMCache's internal API ``DELETE /cache/clear`` on a real simulator: the CPU tier empties, the next
lookup of the same prompt finds nothing there, and only the named locations are cleared."""

from __future__ import annotations

import httpx
from tests.engine_sim_server.conftest import Sim, run_sim
from tests.engine_sim_server.promtext import sample
from tests.engine_sim_server.test_lmcache_metrics import LABELS, complete

from kvstack.engine.sim.config import KV_BYTES_PER_TOKEN


def clear(sim: Sim, *locations: str) -> httpx.Response:
    params = [("locations", loc) for loc in locations]
    return httpx.delete(f"{sim.url}/cache/clear", params=params, timeout=30)


def usage(sim: Sim) -> float:
    return sample(sim.metrics(), "lmcache:local_cache_usage", **LABELS)


def test_clear_empties_the_cpu_tier_and_the_next_lookup_misses() -> None:
    with run_sim("--speed", "50", "--lmcache") as sim:
        complete(sim)
        assert usage(sim) == 1024 * KV_BYTES_PER_TOKEN
        # another backend named: the CPU tier is left alone
        other = clear(sim, "LocalDiskBackend")
        assert (other.status_code, other.json()) == (200, {"status": "success", "num_removed": 0})
        assert usage(sim) == 1024 * KV_BYTES_PER_TOKEN

        cleared = clear(sim, "LocalCPUBackend")
        assert (cleared.status_code, cleared.json()) == (200, {"status": "success", "num_removed": 1024})
        assert usage(sim) == 0
        assert httpx.post(f"{sim.url}/reset_prefix_cache", timeout=30).status_code == 200
        complete(sim)  # neither the GPU nor LMCache holds the prompt now: computed and stored again
        text = sim.metrics()
    assert sample(text, "lmcache:num_hit_tokens_total", **LABELS) == 0
    assert sample(text, "lmcache:num_stored_tokens_total", **LABELS) == 2048
    # clearing is not eviction: the counters the eviction alert reads stay where allocation left them
    assert sample(text, "lmcache:local_cpu_evict_keys_count_total", **LABELS) == 0


def test_clear_without_locations_clears_the_cpu_tier() -> None:
    with run_sim("--speed", "50", "--lmcache") as sim:
        complete(sim)
        r = clear(sim)
        assert (r.status_code, r.json()["num_removed"]) == (200, 1024)
        assert usage(sim) == 0


def test_clear_without_lmcache_is_a_404_in_the_openai_shape(sim: Sim) -> None:
    r = clear(sim)
    assert r.status_code == 404
    assert "LMCache is off" in r.json()["error"]["message"]
