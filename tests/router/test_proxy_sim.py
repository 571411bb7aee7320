"""End to end through the router to real simulator processes, with the real openai SDK."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from kvstack.common.waits import wait_until, wait_until_async

from .conftest import MODEL, RouterFactory, Sim


def test_openai_sync_chat_and_stream(sims: list[Sim], router: RouterFactory, backend: str) -> None:
    r = router(engines=[s.url for s in sims], upstream_backend=backend)
    client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 8
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    # a client that lags gets tokens coalesced into fewer deltas (as from vLLM): count tokens by usage
    assert 1 <= len([p for p in pieces if p]) <= 6
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 6

    def counted() -> tuple[float, float, float]:
        answered = sum(
            r.metric("kvstack_router_requests_total", model_name=MODEL, engine=s.url, status="200")
            for s in sims
        )
        ttft = r.metric("kvstack_router_time_to_first_token_seconds_count", model_name=MODEL)
        return answered, ttft, r.metric("kvstack_router_request_duration_seconds_count", model_name=MODEL)

    # the client may see the stream's last byte before the router's handler returns and counts it
    wait_until(lambda: counted() == (2, 1, 2), "two answers, one first token, two durations", 5, 0.01)


async def test_openai_async_completions_stream_and_models(sims: list[Sim], router: RouterFactory) -> None:
    r = router(engines=[s.url for s in sims], policy="round_robin")
    client = openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0)
    try:
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        for _ in range(4):
            text = ""
            stream = await client.completions.create(
                model=MODEL, prompt="once upon", max_tokens=5, stream=True
            )
            async for chunk in stream:
                text += chunk.choices[0].text if chunk.choices else ""
            assert text
    finally:
        await client.close()

    def per_engine() -> list[float]:
        return [
            r.metric("kvstack_router_requests_total", model_name=MODEL, engine=s.url, status="200")
            for s in sims
        ]

    # the last stream may be counted just after the client saw its end; round robin: two each
    await wait_until_async(lambda: per_engine() == [2, 2], "two answers from each engine", 5, 0.01)


def test_tokenize_passthrough_and_request_id_round_trip(sims: list[Sim], router: RouterFactory) -> None:
    r = router(engines=[s.url for s in sims])
    resp = httpx.post(
        f"{r.url}/tokenize",
        json={"model": MODEL, "prompt": "hello world"},
        headers={"x-request-id": "abc-123"},
    )
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == "abc-123"
    assert resp.json()["count"] == len(resp.json()["tokens"]) > 0
    detok = httpx.post(f"{r.url}/detokenize", json={"model": MODEL, "tokens": resp.json()["tokens"]})
    assert detok.json()["prompt"] == "hello world"
    generated = httpx.get(f"{r.url}/health").headers["x-request-id"]
    assert len(generated) == 32 and generated != httpx.get(f"{r.url}/health").headers["x-request-id"]
    bad = httpx.post(
        f"{r.url}/v1/completions", json={"model": "nope", "prompt": "x"}, headers={"x-request-id": "r-404"}
    )
    assert bad.status_code == 404 and bad.headers["x-request-id"] == "r-404"


def test_metrics_endpoint_exposes_router_series_only(sims: list[Sim], router: RouterFactory) -> None:
    r = router(engines=[s.url for s in sims])
    httpx.post(f"{r.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    text = httpx.get(f"{r.url}/metrics").text
    for series in (
        "kvstack_router_requests_total",
        "kvstack_router_request_duration_seconds_bucket",
        "kvstack_router_routing_decision_seconds_bucket",
        "kvstack_router_engine_in_flight_requests",
        "kvstack_router_engine_available",
        "kvstack_router_rejections_total",
    ):
        assert series in text
    assert "vllm:" not in text
    assert f'kvstack_router_engine_available{{engine="{sims[0].url}"}} 1.0' in text


def test_ready_and_health(sims: list[Sim], router: RouterFactory) -> None:
    idle = router(engines=[], available=0)
    assert httpx.get(f"{idle.url}/health").status_code == 200
    resp = httpx.get(f"{idle.url}/ready")
    assert resp.status_code == 503 and resp.json()["reason"] == "no_engine"
    # the chart's startup probe: up with no engine (a model scaled to zero), nothing to replay
    resp = httpx.get(f"{idle.url}/ready", params={"require_engine": "false"})
    assert resp.status_code == 200 and resp.json()["reason"] == "no_engine"
    resp = httpx.get(f"{idle.url}/ready", params={"require_engine": "perhaps"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "require_engine", resp.text
    r = router(engines=[s.url for s in sims])
    assert httpx.get(f"{r.url}/ready").json() == {
        "ready": True,
        "reason": "ready",
        "available_engines": 2,
        "syncing_engines": 0,  # these publish no KV events: nothing to replay
        "engines": 2,
    }


def test_client_disconnect_aborts_the_engine_request(
    slow_sims: list[Sim], router: RouterFactory, backend: str
) -> None:
    sim = slow_sims[0]
    r = router(engines=[sim.url], upstream_backend=backend)
    before = sim.metric("vllm:request_success_total", finished_reason="abort")
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST",
            f"{r.url}/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "tell"}],
                "max_tokens": 500,
                "stream": True,
            },
        ) as resp,
    ):
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert any(line.startswith("data:") and "content" in line for line in lines)
    # the client hung up mid-stream: the engine must see its request aborted
    aborted = "vllm:request_success_total"
    wait_until(lambda: sim.metric(aborted, finished_reason="abort") > before, "the engine's abort", 5, 0.05)
    assert sim.metric("vllm:num_requests_running") == 0
    disconnects = "kvstack_router_client_disconnects_total"
    wait_until(lambda: r.metric(disconnects, model_name=MODEL) == 1, "one client disconnect counted", 2, 0.02)
    assert r.ctx.registry.all()[0].in_flight == 0


def test_engine_killed_mid_stream(slow_sims: list[Sim], router: RouterFactory, backend: str) -> None:
    r = router(
        engines=[s.url for s in slow_sims],
        eject_after_failures=1,
        eject_duration_s=60,
        upstream_backend=backend,
    )
    client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0, timeout=20)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "long story"}], max_tokens=500, stream=True
    )
    first = next(iter(stream))
    assert first.choices
    busy = next(e for e in r.ctx.registry.all() if e.in_flight == 1)
    victim = next(s for s in slow_sims if s.url == busy.url)
    victim.proc.stop(timeout=0)  # SIGTERM then SIGKILL of the engine's process group
    started = time.monotonic()
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    assert time.monotonic() - started < 10  # a clean error, not a hang until some timeout
    survivor = next(s for s in slow_sims if s is not victim)
    for _ in range(5):
        reply = client.completions.create(model=MODEL, prompt="again", max_tokens=1)
        assert reply.choices[0].text is not None
    assert r.metric("kvstack_router_requests_total", model_name=MODEL, engine=survivor.url, status="200") == 5
    assert not busy.available(r.ctx.clock())
