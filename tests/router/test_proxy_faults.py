"""Broken engines and bad clients: timeouts, retries, ejection, errors, protection."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from kvstack.common.waits import wait_until

from .conftest import _COMPLETION as COMPLETION
from .conftest import MODEL, BadEngine, RawEngine, RouterFactory, Sim, reply, run_sims

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_hanging_engine_times_out_with_504(router: RouterFactory, backend: str) -> None:
    with BadEngine("hang") as bad:
        r = router(engines=[bad.url], first_byte_timeout_s=0.5, upstream_backend=backend)
        started = time.monotonic()
        resp = httpx.post(f"{r.url}/v1/chat/completions", json=CHAT, timeout=10)
        assert resp.status_code == 504
        assert resp.json()["error"]["type"] == "GatewayTimeoutError"
        assert time.monotonic() - started < 5
        assert r.metric("kvstack_router_upstream_errors_total", engine=bad.url, kind="timeout") == 1
        assert bad.posts == 1  # a timeout is never retried: the engine may still be working on it


def test_stalled_stream_ends_with_an_error_event(router: RouterFactory, backend: str) -> None:
    with BadEngine("stall") as bad:
        r = router(engines=[bad.url], idle_timeout_s=0.5, upstream_backend=backend)
        client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="x", max_retries=0, timeout=10)
        stream = client.chat.completions.create(model=MODEL, messages=CHAT["messages"], stream=True)
        with pytest.raises(openai.APIError, match="broke off"):
            for _ in stream:
                pass
        assert r.metric("kvstack_router_requests_total", model_name=MODEL, engine=bad.url, status="504") == 1


def test_engine_500_is_passed_through_when_no_other_engine_and_ejects(
    router: RouterFactory, backend: str
) -> None:
    with BadEngine("status:500") as bad:
        # its /health passes all along (fast probes): that must not bring it back early
        r = router(engines=[bad.url], eject_after_failures=2, eject_duration_s=60, upstream_backend=backend)
        for _ in range(2):
            resp = httpx.post(f"{r.url}/v1/chat/completions", json=CHAT)
            assert resp.status_code == 500
            assert resp.json()["error"]["message"] == "engine failure"
        assert r.metric("kvstack_router_engine_ejections_total", engine=bad.url) == 1
        state = r.ctx.registry.get(bad.url)
        assert state is not None and not state.available(r.ctx.clock())
        probes = bad.probes
        wait_until(lambda: bad.probes >= probes + 3, "good probes during the ejection", timeout=30)
        assert not state.available(r.ctx.clock())  # still ejected
        # the model's last engine, only ejected: it still gets the request (Envoy's panic routing),
        # and its own answer goes through rather than a 503 from the router
        resp = httpx.post(f"{r.url}/v1/chat/completions", json=CHAT)
        assert resp.status_code == 500
        assert bad.posts == 3
        assert r.metric("kvstack_router_engine_ejections_total", engine=bad.url) == 1


def test_an_ejected_engine_that_is_back_serves_when_the_one_left_dies(
    router: RouterFactory, tmp_path: Path, backend: str
) -> None:
    """One engine ejected (it failed; now it is back, as a restarted pod is), the other dies before
    its probes notice: each request that finds the dead one is retried on the ejected one and
    answered, where it used to be a 502 with a working engine beside it."""
    with BadEngine("status:500") as back, run_sims(tmp_path, 1) as (doomed,):
        slow_monitor = {"probe_interval": 60.0, "scrape_interval": 60.0}
        r = router(
            engines=[back.url, doomed.url],
            policy="round_robin",
            eject_after_failures=1,
            eject_duration_s=60,
            monitor=slow_monitor,
            upstream_backend=backend,
        )
        for _ in range(2):  # back's 500 is retried on doomed, and ejects back
            assert httpx.post(f"{r.url}/v1/chat/completions", json=CHAT).status_code == 200
        assert r.metric("kvstack_router_engine_ejections_total", engine=back.url) == 1
        back.mode = "no_tokenize"  # answers chat completions again
        posts = back.posts
        doomed.proc.stop()
        for _ in range(4):
            assert httpx.post(f"{r.url}/v1/chat/completions", json=CHAT).status_code == 200
        assert back.posts == posts + 4
        # doomed is not ejected (half of two engines are already), so each request tries it first
        assert r.metric("kvstack_router_retries_total", model_name=MODEL, reason="connect") == 4


def test_engine_503_is_retried_on_another_engine(
    sims: list[Sim], router: RouterFactory, backend: str
) -> None:
    with BadEngine("status:503") as bad:
        r = router(engines=[bad.url, sims[0].url], policy="round_robin", upstream_backend=backend)
        for _ in range(4):
            assert httpx.post(f"{r.url}/v1/chat/completions", json=CHAT).status_code == 200
        assert bad.posts >= 1
        assert r.metric("kvstack_router_retries_total", model_name=MODEL, reason="503") == bad.posts


def test_connect_refused_is_retried_and_the_dead_engine_ejected(
    sims: list[Sim], router: RouterFactory, tmp_path: Path, backend: str
) -> None:
    with run_sims(tmp_path, 1) as (doomed,):
        # slow probes: the router learns of the death from requests, not from the monitor
        slow_monitor = {"probe_interval": 60.0, "scrape_interval": 60.0}
        r = router(
            engines=[doomed.url, sims[0].url],
            policy="round_robin",
            eject_after_failures=2,
            monitor=slow_monitor,
            upstream_backend=backend,
        )
        doomed.proc.stop()
        for _ in range(6):
            assert httpx.post(f"{r.url}/v1/chat/completions", json=CHAT).status_code == 200
    assert r.metric("kvstack_router_retries_total", model_name=MODEL, reason="connect") == 2
    assert r.metric("kvstack_router_requests_total", model_name=MODEL, engine=sims[0].url, status="200") == 6
    assert r.metric("kvstack_router_engine_ejections_total", engine=doomed.url) == 1
    assert not r.ctx.registry.get(doomed.url).available(r.ctx.clock())  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("path", "content", "status", "param"),
    [
        ("/v1/chat/completions", b"{oops", 400, None),
        ("/v1/chat/completions", b'{"model": "m"}', 400, "messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', 400, "model"),
        ("/v1/completions", b'{"model": "%s", "prompt": "x", "stream": 1}' % MODEL.encode(), 400, "stream"),
        (
            "/v1/completions",
            b'{"model": "%s", "prompt": "x", "max_tokens": "5"}' % MODEL.encode(),
            400,
            "max_tokens",
        ),
        ("/v1/completions", b'{"model": "no-such-model", "prompt": "x"}', 404, "model"),
    ],
)
def test_malformed_input(
    sims: list[Sim], router: RouterFactory, path: str, content: bytes, status: int, param: str | None
) -> None:
    r = router(engines=[sims[0].url])
    resp = httpx.post(f"{r.url}{path}", content=content, headers={"content-type": "application/json"})
    assert resp.status_code == status
    assert resp.json()["error"]["param"] == param
    assert resp.json()["error"]["code"] == status


@pytest.mark.parametrize("policy", ["cache_aware", "prefix_trie"])
def test_a_text_part_that_is_not_text_is_400_for_the_policies_that_read_it(
    sims: list[Sim], router: RouterFactory, policy: str
) -> None:
    # These policies read the prompt (tokens, text) before routing: a malformed part must be the
    # client's 400, never a failure inside the router.
    r = router(engines=[sims[0].url], policy=policy)
    body = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}
    resp = httpx.post(f"{r.url}/v1/chat/completions", json=body)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "messages"
    assert "content[0].text" in resp.json()["error"]["message"]


def test_fastapi_validation_and_routing_errors_are_openai_shaped(router: RouterFactory) -> None:
    r = router(engines=[], available=0)
    resp = httpx.get(f"{r.url}/router/engines", params={"available": "maybe"})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "available"
    assert httpx.get(f"{r.url}/no/such/route").json()["error"]["code"] == 404
    assert httpx.get(f"{r.url}/v1/chat/completions").status_code == 405


def test_oversized_body_is_413(sims: list[Sim], router: RouterFactory) -> None:
    r = router(engines=[sims[0].url], max_body_bytes=4096)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert httpx.post(f"{r.url}/v1/chat/completions", json=big).status_code == 413

    def chunked() -> object:
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        yield b"y" * 5000
        yield b'"}]}'

    resp = httpx.post(f"{r.url}/v1/chat/completions", content=chunked())  # no Content-Length
    assert resp.status_code == 413
    assert resp.json()["error"]["type"] == "RequestTooLargeError"
    assert r.metric("kvstack_router_rejections_total", reason="body_too_large") == 2


def test_api_keys(sims: list[Sim], router: RouterFactory, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("team-a sk-good\n")
    r = router(engines=[sims[0].url], api_keys_file=keys)
    url = f"{r.url}/v1/chat/completions"
    assert httpx.post(url, json=CHAT).status_code == 401
    assert httpx.post(url, json=CHAT, headers={"authorization": "Bearer sk-bad"}).status_code == 401
    assert httpx.get(f"{r.url}/v1/models").status_code == 401
    good = openai.OpenAI(base_url=f"{r.url}/v1", api_key="sk-good", max_retries=0)
    assert good.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=2).choices
    assert [m.id for m in good.models.list().data] == [MODEL]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{r.url}/v1", api_key="sk-nope", max_retries=0).models.list()
    for open_path in ("/health", "/ready"):
        assert httpx.get(f"{r.url}{open_path}").status_code == 200
    # without a metrics_port, /metrics is on the API port and as protected as the API
    assert httpx.get(f"{r.url}/metrics").status_code == 401
    assert httpx.get(f"{r.url}/metrics", headers={"authorization": "Bearer sk-good"}).status_code == 200
    assert r.metric("kvstack_router_rejections_total", reason="auth") == 5


def test_rate_limit_per_key(sims: list[Sim], router: RouterFactory) -> None:
    r = router(engines=[sims[0].url], api_keys=["sk-a", "sk-b"], rate_limit_rps=0.1, rate_limit_burst=2)
    url = f"{r.url}/v1/chat/completions"
    a, b = {"authorization": "Bearer sk-a"}, {"authorization": "Bearer sk-b"}
    assert [httpx.post(url, json=CHAT, headers=a).status_code for _ in range(3)] == [200, 200, 429]
    limited = httpx.post(url, json=CHAT, headers=a)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"]["type"] == "RateLimitError"
    assert httpx.post(url, json=CHAT, headers=b).status_code == 200  # another key has its own bucket


def test_admission_queue_full_is_429(slow_sims: list[Sim], router: RouterFactory) -> None:
    r = router(
        engines=[slow_sims[0].url], max_in_flight_per_engine=1, flow_control={"models": [{"max_queue": 1}]}
    )
    url = f"{r.url}/v1/chat/completions"
    slow = {**CHAT, "max_tokens": 100}  # long enough to still be running while the test looks
    results: list[int] = []

    def send() -> None:
        results.append(httpx.post(url, json=slow, timeout=30).status_code)

    threads = [threading.Thread(target=send) for _ in range(2)]
    threads[0].start()
    wait_until(lambda: r.ctx.registry.all()[0].in_flight == 1, "the first in flight", 10, 0.01)
    threads[1].start()
    queues = r.ctx.flow.queues
    wait_until(lambda: MODEL in queues and len(queues[MODEL]) == 1, "the second queued", 10, 0.01)
    resp = httpx.post(url, json=slow)
    assert resp.status_code == 429
    assert "queued" in resp.json()["error"]["message"]
    for t in threads:
        t.join()
    assert results == [200, 200]
    assert r.metric("kvstack_router_rejections_total", reason="queue_full") == 1


class SlowHealthEngine(RawEngine):
    """Answers every POST with a chat completion at once; once ``slow`` is set, answers ``/health``
    only after ``HEALTH_DELAY_S``: an engine whose API server is too loaded for its probes."""

    HEALTH_DELAY_S = 2.0

    def __init__(self) -> None:
        super().__init__()
        self.slow = False

    async def get(self, path: str) -> bytes:
        if path == "/health" and self.slow:
            await asyncio.sleep(self.HEALTH_DELAY_S)
        return await super().get(path)

    async def post(
        self, method: str, path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(reply(200, COMPLETION))


def test_an_engine_too_busy_for_its_probes_but_answering_stays_healthy(router: RouterFactory) -> None:
    """/health times out while the engine answers every request: the probes find it busy, not
    down, so it keeps its requests (marking it down would end those in flight and send the rest to
    other engines, the cascade a health check can start). Once it answers nothing any more, the same
    timeouts mark it unhealthy, as for a frozen engine."""
    monitor = {"probe_interval": 0.2, "probe_timeout": 0.1, "unhealthy_threshold": 2}
    with SlowHealthEngine() as engine:
        r = router(engines=[engine.url], monitor=monitor)
        state = r.ctx.registry.get(engine.url)
        assert state is not None and state.healthy
        engine.slow = True
        probes = engine.probes
        with httpx.Client(timeout=10) as client:
            while engine.probes < probes + 8:  # each probe times out, about four probe intervals' worth
                resp = client.post(f"{r.url}/v1/chat/completions", json=CHAT)
                assert resp.status_code == 200, resp.text
                assert state.healthy
                time.sleep(0.05)
        # no request answered within a probe interval and its timeout: the timeouts are failures
        wait_until(
            lambda: not state.healthy, "the idle engine with a silent /health marked unhealthy", 10, 0.05
        )


def test_a_held_model_whose_only_engine_is_ejected_is_served_not_held(router: RouterFactory) -> None:
    """Scale from zero holds a request while its model has no engine. An engine that is only
    ejected is still one (``engines.routable``): once it answers again, the next request is served
    at once, where it used to wait in the hold until the ejection ended."""
    with BadEngine("status:500") as back:
        r = router(engines=[back.url], hold_models=[MODEL], eject_after_failures=1, eject_duration_s=60)
        assert httpx.post(f"{r.url}/v1/chat/completions", json=CHAT).status_code == 500
        state = r.ctx.registry.get(back.url)
        assert state is not None and not state.available(r.ctx.clock())  # ejected for a minute
        back.mode = "no_tokenize"  # answers chat completions again
        resp = httpx.post(f"{r.url}/v1/chat/completions", json=CHAT, timeout=10)
        assert resp.status_code == 200
        assert r.metric("kvstack_router_queued_requests", model_name=MODEL) == 0
        assert back.posts == 2
