"""The monitor's GETs (router/fetch.py) against a real HTTP engine: bodies, statuses, the time limit,
unreachable engines, and a pool of their own that proxied traffic cannot fill."""

from __future__ import annotations

import asyncio

import pytest
from tests.conftest import free_port
from tests.router_discovery.conftest import SwitchableEngine, until, vllm_metrics

from kvstack.router.fetch import EngineFetch, FetchError
from kvstack.router.upstream import Timeouts, Upstream


async def test_a_2xx_answer_is_its_body(client: EngineFetch, engine: SwitchableEngine) -> None:
    engine.metrics_text = vllm_metrics(running=3)
    assert await client.get_text(engine.url + "/metrics", within=1.0) == engine.metrics_text
    assert await client.get(engine.url + "/metrics", within=1.0) == engine.metrics_text.encode()
    models = await client.get_json(engine.url + "/v1/models", within=1.0)
    assert [card["id"] for card in models["data"]] == ["m"]


@pytest.mark.parametrize(
    ("status", "ok"), [(200, True), (204, True), (301, False), (404, False), (503, False)]
)
async def test_only_a_2xx_answer_is_a_success(
    client: EngineFetch, engine: SwitchableEngine, status: int, ok: bool
) -> None:
    # as the monitor's probes decide: a redirect is not followed, it is a failed probe
    engine.health_status = status
    if ok:
        assert await client.get(engine.url + "/health", within=1.0) == b""
        return
    with pytest.raises(FetchError, match=f"HTTP {status}") as caught:
        await client.get(engine.url + "/health", within=1.0)
    assert caught.value.status == status


async def test_the_engine_s_headers_are_sent(client: EngineFetch, engine: SwitchableEngine) -> None:
    engine.api_key = "sekret"
    with pytest.raises(FetchError) as caught:
        await client.get_json(engine.url + "/v1/models", within=1.0)
    assert caught.value.status == 401
    url = engine.url + "/v1/models"
    models = await client.get_json(url, within=1.0, headers={"Authorization": "Bearer sekret"})
    assert models["object"] == "list"


async def test_a_body_that_is_not_json_is_a_fetch_error(
    client: EngineFetch, engine: SwitchableEngine
) -> None:
    with pytest.raises(FetchError, match="not JSON") as caught:
        await client.get_json(engine.url + "/metrics", within=1.0)
    assert caught.value.status is None


async def test_a_body_over_the_limit_is_a_fetch_error(engine: SwitchableEngine) -> None:
    small = EngineFetch(max_body_bytes=1000)
    try:
        engine.metrics_text = "x" * 999
        assert len(await small.get(engine.url + "/metrics", within=1.0)) == 999
        engine.metrics_text = "x" * 1001
        with pytest.raises(FetchError, match="over 1000"):
            await small.get(engine.url + "/metrics", within=1.0)
        engine.metrics_text = vllm_metrics()
        assert await small.get_text(engine.url + "/metrics", within=1.0) == engine.metrics_text
    finally:
        await small.aclose()


async def test_no_engine_is_a_fetch_error(client: EngineFetch) -> None:
    with pytest.raises(FetchError) as caught:
        await client.get(f"http://127.0.0.1:{free_port()}/health", within=1.0)
    assert caught.value.status is None


async def test_an_engine_that_does_not_answer_fails_at_the_limit(
    client: EngineFetch, engine: SwitchableEngine
) -> None:
    with pytest.raises(FetchError, match=r"no answer within 0\.2 s"):
        await client.get(engine.url + "/stall", within=0.2)
    assert engine.hits["stall"] == 1
    # the stalled connection is not handed out again: the next GET has its answer
    assert await client.get(engine.url + "/health", within=1.0) == b""


async def test_a_full_upstream_pool_never_delays_a_probe(
    client: EngineFetch, engine: SwitchableEngine
) -> None:
    # the upstream's only connection is held by a request the engine never answers (a long stream)
    upstream = Upstream(Timeouts(connect=30.0, first_byte=30.0, idle=30.0), max_connections=1)
    held = asyncio.create_task(upstream.send("GET", engine.url + "/stall", [], None))
    try:
        await until(lambda: engine.hits["stall"] == 1, "the upstream's connection is held")
        with pytest.raises(TimeoutError):  # proxied traffic now waits for a connection
            async with asyncio.timeout(0.3):
                await upstream.send("GET", engine.url + "/health", [], None)
        assert engine.hits["health"] == 0
        # the monitor's GETs have their own pool, and it has no limit: three stalled GETs of its
        # own do not make a probe wait either
        stalled = [asyncio.create_task(client.get(engine.url + "/stall", within=30.0)) for _ in range(3)]
        await until(lambda: engine.hits["stall"] == 4, "three more stalled GETs")
        assert await client.get(engine.url + "/health", within=1.0) == b""
        assert engine.hits["health"] == 1
        for task in stalled:
            task.cancel()
        await asyncio.gather(*stalled, return_exceptions=True)
    finally:
        held.cancel()
        await asyncio.gather(held, return_exceptions=True)
        await upstream.aclose()
