"""The monitor against real HTTP engines: health, ejection, scrapes, staleness, models, membership."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from tests.router_discovery.conftest import SwitchableEngine, until, vllm_metrics  # until: re-exported

from kvstack.router.ejection import OutlierTrack
from kvstack.router.engines import Endpoint, EngineRegistry, EngineState
from kvstack.router.fetch import EngineFetch
from kvstack.router.monitor import EngineMonitor, MonitorConfig

FAST = MonitorConfig(
    probe_interval=0.05,
    probe_timeout=0.5,
    unhealthy_threshold=3,
    healthy_threshold=2,
    scrape_interval=0.05,
    scrape_timeout=0.5,
    stale_after=0.3,
    models_interval=0.2,
)


class Rig:
    def __init__(self, client: EngineFetch, config: MonitorConfig) -> None:
        self.registry = EngineRegistry()
        self.monitor = EngineMonitor(self.registry, client, config)

    def add(self, *endpoints: Endpoint) -> list[EngineState]:
        self.registry.sync([*(st.endpoint for st in self.registry.all()), *endpoints])
        return [st for ep in endpoints if (st := self.registry.get(ep.url)) is not None]


@pytest.fixture
async def rig(client: EngineFetch) -> AsyncIterator[Rig]:
    r = Rig(client, FAST)
    r.monitor.start()
    try:
        yield r
    finally:
        await r.monitor.stop()


async def test_learns_models_and_follows_load(rig: Rig, engine: SwitchableEngine) -> None:
    (st,) = rig.add(Endpoint(engine.url, "e1"))
    assert not st.available(time.monotonic())  # no models known yet
    await until(lambda: st.models == {"m"}, "models from /v1/models")
    await until(lambda: st.num_running == 0 and st.block_size == 16, "first scrape")
    assert st.available(time.monotonic())
    assert rig.registry.candidates("m", time.monotonic()) == [st]
    assert st.num_gpu_blocks == 1024

    engine.metrics_text = vllm_metrics(running=5, waiting=2, usage=0.4)
    await until(lambda: st.num_running == 5, "scrape follows load")
    assert (st.num_waiting, st.kv_cache_usage, st.load) == (2, 0.4, 7)

    engine.models = ["m", "m-lora"]  # an adapter loaded at run time
    await until(lambda: st.models == {"m", "m-lora"}, "models refreshed")


async def test_listed_models_are_not_fetched(rig: Rig, engine: SwitchableEngine) -> None:
    (st,) = rig.add(Endpoint(engine.url, "e1", models=frozenset({"configured"})))
    await until(lambda: engine.hits["health"] >= 3 and st.last_scrape > 0, "probes and a scrape")
    assert st.models == {"configured"}
    assert engine.hits["models"] == 0


async def test_failed_probes_mark_unhealthy_and_good_ones_bring_it_back(
    rig: Rig, engine: SwitchableEngine
) -> None:
    (st,) = rig.add(Endpoint(engine.url, "e1"))
    await until(lambda: st.available(time.monotonic()), "engine available")
    engine.health_status = 503
    seen = engine.hits["health"]
    await until(lambda: not st.healthy, "unhealthy after failed probes")
    assert engine.hits["health"] - seen >= 3  # not before unhealthy_threshold failures
    assert rig.registry.candidates("m", time.monotonic()) == []
    engine.health_status = 200
    seen = engine.hits["health"]
    await until(lambda: st.healthy, "healthy again")
    assert engine.hits["health"] - seen >= 2
    assert rig.registry.candidates("m", time.monotonic()) == [st]


async def test_killed_engine_goes_stale_unhealthy_and_returns_on_the_same_port(
    rig: Rig, engine: SwitchableEngine
) -> None:
    (st,) = rig.add(Endpoint(engine.url, "e1"))
    engine.metrics_text = vllm_metrics(running=4)
    await until(lambda: st.num_running == 4 and st.available(time.monotonic()), "engine up and scraped")
    await engine.stop()
    await until(lambda: not st.healthy, "a dead engine is unhealthy")
    await until(lambda: st.num_running is None and st.kv_cache_usage is None, "stale figures dropped")
    assert st.block_size == 16
    assert st.models == {"m"}  # kept, so it is routable as soon as it is healthy again

    engine.metrics_text = vllm_metrics(running=1)
    await engine.start()
    await until(lambda: st.healthy and st.num_running == 1, "re-admitted after restart")
    assert st.available(time.monotonic())


async def test_good_probes_never_lift_a_passive_ejection(rig: Rig, engine: SwitchableEngine) -> None:
    # an engine can answer /health and fail every request: only the ejection's time ends it
    (st,) = rig.add(Endpoint(engine.url, "e1"))
    await until(lambda: st.available(time.monotonic()), "engine available")
    st.outlier = OutlierTrack(consecutive=3, ejections=1, ejected_until=time.monotonic() + 3600)
    seen = engine.hits["health"]
    await until(lambda: engine.hits["health"] >= seen + 4, "good probes during the ejection")
    assert st.healthy and not st.available(time.monotonic())
    assert st.outlier.consecutive == 3


async def test_declaring_an_engine_down_ends_its_requests(rig: Rig, engine: SwitchableEngine) -> None:
    (st,) = rig.add(Endpoint(engine.url, "e1"))
    await until(lambda: st.available(time.monotonic()), "engine available")
    ended: list[str] = []
    st.on_down.add(lambda: ended.append("request"))
    engine.health_status = 503
    await until(lambda: not st.healthy, "marked unhealthy")
    assert ended == ["request"]  # once, on the way down


async def test_follows_registry_membership(rig: Rig, engine: SwitchableEngine) -> None:
    (st,) = rig.add(Endpoint(engine.url, "e1"))
    await until(lambda: st.available(time.monotonic()), "engine available")
    rig.registry.sync([])
    await until(lambda: not rig.monitor._workers, "loops of a removed engine end")
    seen = sum(engine.hits.values())
    await asyncio.sleep(0.3)  # six probe intervals: a leftover loop would have hit the engine
    assert sum(engine.hits.values()) == seen


async def test_unreachable_engine_added_is_unhealthy_at_once(rig: Rig) -> None:
    from tests.conftest import free_port

    (st,) = rig.add(Endpoint(f"http://127.0.0.1:{free_port()}", "nobody", models=frozenset({"m"})))
    await until(lambda: not st.healthy, "first failed probe decides")
    assert rig.registry.candidates("m", time.monotonic()) == []


async def test_api_key_is_sent_for_models(client: EngineFetch, engine: SwitchableEngine) -> None:
    engine.api_key = "sekret"
    registry = EngineRegistry()
    registry.sync([Endpoint(engine.url, "e1")])
    (st,) = registry.all()
    without = EngineMonitor(registry, client, FAST)
    assert not await without.refresh_models(st)
    assert st.models == frozenset()
    keyed = EngineMonitor(registry, client, MonitorConfig(**{**FAST.model_dump(), "api_key": "sekret"}))
    assert await keyed.refresh_models(st)
    assert st.models == {"m"}
    # the router's app fills the key in with model_copy(), which skips validation
    copied = EngineMonitor(registry, client, FAST.model_copy(update={"api_key": "sekret"}))
    engine.models = ["m2"]
    assert await copied.refresh_models(st)
    assert st.models == {"m2"}


def monitor_of(client: EngineFetch, engine: SwitchableEngine) -> tuple[EngineMonitor, EngineState]:
    """A monitor of ``engine`` alone (not started: the test drives its scrapes) and its state."""
    registry = EngineRegistry()
    registry.sync([Endpoint(engine.url, "e1")])
    (st,) = registry.all()
    return EngineMonitor(registry, client, FAST), st


async def test_bad_metrics_fail_the_scrape_and_keep_nothing_half_parsed(
    client: EngineFetch, engine: SwitchableEngine
) -> None:
    monitor, st = monitor_of(client, engine)
    engine.metrics_text = vllm_metrics(running=2)
    assert await monitor.scrape_once(st)
    engine.metrics_text = (
        'vllm:num_requests_running{model_name="m"} 9\nvllm:num_requests_waiting{model_name=} 1\n'
    )
    assert not await monitor.scrape_once(st)
    assert st.num_running == 2  # the last good scrape, until it goes stale


async def test_models_relearnt_when_another_pod_takes_the_address(
    client: EngineFetch, engine: SwitchableEngine
) -> None:
    r = Rig(client, MonitorConfig(**{**FAST.model_dump(), "models_interval": 3600}))
    r.monitor.start()
    try:
        (st,) = r.add(Endpoint(engine.url, "pod-a"))
        await until(lambda: st.models == {"m"}, "models of pod-a")
        engine.models = ["n"]
        r.registry.sync([Endpoint(engine.url, "pod-b")])  # same IP and port, another pod
        await until(lambda: st.models == {"n"}, "models of pod-b, long before models_interval")
    finally:
        await r.monitor.stop()


@pytest.mark.parametrize(
    ("filtered_text", "why"),
    [(None, "a 404"), ("# nothing asked for is here\n", "an answer without the samples asked")],
)
async def test_an_engine_whose_filtered_scrape_fails_is_scraped_whole_from_then_on(
    client: EngineFetch, engine: SwitchableEngine, filtered_text: str | None, why: str
) -> None:
    monitor, st = monitor_of(client, engine)
    engine.filtered_text = filtered_text
    engine.metrics_text = vllm_metrics(running=3)
    assert await monitor.scrape_once(st), why
    assert st.num_running == 3  # from the whole scrape, the same round
    assert await monitor.scrape_once(st)
    assert (engine.hits["filtered_metrics"], engine.hits["metrics"]) == (1, 2)  # asked once only
    assert monitor.scraped_whole == {engine.url}


async def test_an_engine_that_filters_its_scrape_is_not_scraped_whole(
    client: EngineFetch, engine: SwitchableEngine
) -> None:
    monitor, st = monitor_of(client, engine)
    engine.filtered_text = vllm_metrics(running=4)
    for _ in range(2):
        assert await monitor.scrape_once(st)
    assert st.num_running == 4
    assert (engine.hits["filtered_metrics"], engine.hits["metrics"]) == (2, 0)
    assert monitor.scraped_whole == set()
