"""The monitor scrapes a real simulator (vLLM's ``/metrics`` layout) by sample name: the figures the
router routes on, from ~3 KB instead of ~45 KB, and the engine is never scraped whole."""

from __future__ import annotations

from kvstack.router.engines import Endpoint, EngineRegistry
from kvstack.router.fetch import EngineFetch
from kvstack.router.monitor import EngineMonitor
from kvstack.router.scrape import FILTERED_SCRAPE, FULL_SCRAPE

from .conftest import Sim


async def test_a_simulator_is_scraped_by_name_with_every_figure(sims: list[Sim]) -> None:
    registry = EngineRegistry()
    registry.sync([Endpoint(sims[0].url, "e1")])
    (st,) = registry.all()
    client = EngineFetch()
    try:
        monitor = EngineMonitor(registry, client)
        assert await monitor.scrape_once(st)
        assert monitor.scraped_whole == set()
        assert (st.num_running, st.num_waiting, st.kv_cache_usage) == (0, 0, 0)
        assert st.block_size == 16 and st.num_gpu_blocks
        assert {"prefix_cache_queries", "request_queue_time_seconds_count"} <= set(st.extra)
        filtered = await client.get(sims[0].url + FILTERED_SCRAPE, within=5)
        whole = await client.get(sims[0].url + FULL_SCRAPE, within=5)
        assert 10 * len(filtered) < len(whole)
    finally:
        await client.aclose()
