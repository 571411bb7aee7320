"""OTLP tracing end to end: client -> router -> simulator processes, exported to a real OpenTelemetry
Collector (the ``otel_collector`` fixture); every span asserted on is read back from its file exporter.
The router runs in this process (uvicorn in a thread), the simulators as ``kvstack engine sim``
processes with ``--otlp-traces-endpoint``, as vLLM runs with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import httpx
import openai
import pytest
from tests.conftest import free_port
from tests.router.conftest import FAST_MONITOR, MODEL, BadEngine, RouterServer, Sim, run_sims
from typer.testing import CliRunner

from kvstack.cli import app as kvstack_cli
from kvstack.common.waits import wait_until, wait_until_async
from kvstack.router.config import load_settings
from kvstack_testing.otelcol import (
    HEADER_ATTRIBUTE,
    SPAN_KIND_CLIENT,
    SPAN_KIND_SERVER,
    STATUS_ERROR,
    OtelCollector,
    ReceivedSpan,
)

CLIENT_TRACE, CLIENT_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
ROUTER_STEPS = ("queue", "tokenize", "decide", "upstream")


@pytest.fixture(scope="module")
def traced_sims(
    tmp_path_factory: pytest.TempPathFactory, otel_collector: OtelCollector
) -> Iterator[list[Sim]]:
    """Two simulators exporting their spans, batched for 0.2 s (the SDK's variable) so tests are quick."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
        mp.setenv("OTEL_SERVICE_NAME", "vllm")
        tmp = tmp_path_factory.mktemp("traced-sims")
        with run_sims(tmp, 2, "--otlp-traces-endpoint", otel_collector.url) as sims:
            yield sims


@pytest.fixture
def traced_router(
    otel_collector: OtelCollector, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[RouterServer]]:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
    started: list[RouterServer] = []
    yield started
    for server in started:
        server.stop()


def start_router(started: list[RouterServer], engines: list[str], **values: object) -> RouterServer:
    settings = load_settings(
        port=free_port(), engines=engines, monitor=FAST_MONITOR, access_log=False, **values
    )
    server = RouterServer(settings).start()
    started.append(server)
    server.wait_available(len(engines))
    return server


def spans_of(otel_collector: OtelCollector, trace_id: str, count: int) -> list[ReceivedSpan]:
    """The trace's spans, once ``count`` of them have arrived."""
    found: list[ReceivedSpan] = []

    def arrived() -> bool:
        found[:] = otel_collector.spans(trace_id)
        return len(found) >= count

    wait_until(arrived, f"{count} spans of trace {trace_id}", 20, 0.05)
    return found


def one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    named = [s for s in spans if s.name == name]
    assert len(named) == 1, f"{name}: {named}"
    return named[0]


def test_client_trace_runs_through_router_into_engine(
    otel_collector: OtelCollector, traced_sims: list[Sim], traced_router: list[RouterServer]
) -> None:
    router = start_router(
        traced_router,
        [s.url for s in traced_sims],
        policy="cache_aware",
        tracing={"enabled": True, "endpoint": otel_collector.url},
    )
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "trace me"}],
        max_tokens=4,
        stream=True,
        extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "tracestate": "vendor=1"},
    )
    request_id = stream.headers["x-request-id"]
    assert "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices)

    spans = spans_of(otel_collector, CLIENT_TRACE, len(ROUTER_STEPS) + 2)
    server = one(spans, "POST /v1/chat/completions")
    assert (server.service, server.kind, server.parent_span_id) == (
        "kvstack-router",
        SPAN_KIND_SERVER,
        CLIENT_SPAN,
    )
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["kvstack.request_id"] == request_id
    assert server.attributes["gen_ai.request.model"] == MODEL
    steps = {name: one(spans, name) for name in ROUTER_STEPS}
    assert all(s.parent_span_id == server.span_id for s in steps.values())
    assert steps["tokenize"].attributes["kvstack.prompt_tokens"] > 0  # cache_aware asked for tokens
    decide, upstream = steps["decide"], steps["upstream"]
    assert decide.attributes["kvstack.policy"] == "cache_aware"
    assert decide.attributes["kvstack.reason"]
    assert isinstance(decide.attributes["kvstack.predicted_hit_tokens"], int)
    assert upstream.attributes["kvstack.engine"] == decide.attributes["kvstack.engine"]
    assert upstream.attributes["url.full"] == f"{decide.attributes['kvstack.engine']}/v1/chat/completions"
    assert (upstream.kind, upstream.attributes["kvstack.attempt"]) == (SPAN_KIND_CLIENT, 1)
    assert "first_byte" in upstream.events
    # the engine continued the trace under the router's upstream span: that was its traceparent
    engine = one(spans, "llm_request")
    assert (engine.service, engine.kind) == ("vllm", SPAN_KIND_SERVER)
    assert engine.parent_span_id == upstream.span_id
    assert engine.attributes["gen_ai.request.id"] == request_id
    assert server.start_ns <= upstream.start_ns <= upstream.end_ns <= server.end_ns


def test_each_try_has_its_upstream_span(
    otel_collector: OtelCollector, traced_sims: list[Sim], traced_router: list[RouterServer]
) -> None:
    """A try answered 500, retried on a simulator: two upstream spans, the engine under the second."""
    with BadEngine("status:500") as bad:
        router = start_router(
            traced_router,
            [bad.url, traced_sims[0].url],
            policy="round_robin",
            tracing={"enabled": True, "endpoint": otel_collector.url},
        )
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
        retried = None
        for n in range(4):  # round robin: one of the first two requests tries the failing engine first
            trace_id = f"{n + 1:032x}"
            client.completions.create(
                model=MODEL,
                prompt="retry me",
                max_tokens=2,
                extra_headers={"traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01"},
            )
            if bad.posts:
                retried = trace_id
                break
        assert retried is not None
        spans = spans_of(otel_collector, retried, 8)  # 4 steps, 2 tries more, engine
    server = one(spans, "POST /v1/completions")
    tries = sorted((s for s in spans if s.name == "upstream"), key=lambda s: s.attributes["kvstack.attempt"])
    assert [t.attributes["kvstack.attempt"] for t in tries] == [1, 2]
    assert all(t.parent_span_id == server.span_id for t in tries)
    failed, answered = tries
    assert failed.attributes["kvstack.engine"] == bad.url
    assert (failed.status_code, failed.attributes["kvstack.failure"]) == (STATUS_ERROR, "status")
    assert "first_byte" not in failed.events and "first_byte" in answered.events
    assert len([s for s in spans if s.name == "decide"]) == 2  # one decision per try
    assert one(spans, "llm_request").parent_span_id == answered.span_id
    assert server.attributes["kvstack.attempts"] == 2


def test_sample_ratio_zero_exports_nothing_but_follows_a_sampled_client(
    otel_collector: OtelCollector, traced_sims: list[Sim], traced_router: list[RouterServer]
) -> None:
    router = start_router(
        traced_router,
        [traced_sims[1].url],
        tracing={"enabled": True, "endpoint": otel_collector.url, "sample_ratio": 0.0},
    )
    before = {s.trace_id for s in otel_collector.spans()}
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
    unsampled = f"00-{'ab' * 16}-{CLIENT_SPAN}-00"  # the client's own decision: not sampled
    for headers in ({}, {}, {"traceparent": unsampled}):
        client.completions.create(model=MODEL, prompt="not traced", max_tokens=2, extra_headers=headers)
    # a sampled client trace is followed: once its spans are in, everything sent before would be too
    sampled = "cd" * 16
    client.completions.create(
        model=MODEL,
        prompt="traced",
        max_tokens=2,
        extra_headers={"traceparent": f"00-{sampled}-{CLIENT_SPAN}-01"},
    )
    spans_of(otel_collector, sampled, len(ROUTER_STEPS) + 2)
    assert {s.trace_id for s in otel_collector.spans()} - before == {sampled}


def test_export_headers_reach_the_collector(
    otel_collector: OtelCollector, traced_sims: list[Sim], traced_router: list[RouterServer]
) -> None:
    router = start_router(
        traced_router,
        [traced_sims[0].url],
        tracing={
            "enabled": True,
            "endpoint": otel_collector.url,
            "headers": {"x-api-key": "k1"},
            "service_name": "edge",
        },
    )
    trace_id = "ef" * 16
    openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0).completions.create(
        model=MODEL,
        prompt="x",
        max_tokens=1,
        extra_headers={"traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01"},
    )
    server = one(spans_of(otel_collector, trace_id, len(ROUTER_STEPS) + 2), "POST /v1/completions")
    assert server.service == "edge"
    # the collector kept the export request's header and copied it onto the spans it carried
    assert server.attributes[HEADER_ATTRIBUTE.format("x-api-key")] == "k1"


async def test_a_request_refused_at_admission_has_its_queue_span(
    otel_collector: OtelCollector, traced_router: list[RouterServer]
) -> None:
    """One slot, no queue: the second request is refused (429) and its trace says where: queue."""
    with BadEngine("hang") as engine:
        router = start_router(
            traced_router,
            [engine.url],
            max_in_flight_per_engine=1,
            flow_control={"models": [{"model": "*", "max_queue": 0}]},
            tracing={"enabled": True, "endpoint": otel_collector.url},
        )
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        async with httpx.AsyncClient(base_url=router.url, timeout=30) as client:
            holding = asyncio.create_task(client.post("/v1/completions", json=body))
            await wait_until_async(lambda: engine.posts == 1, "the first request at the engine", 10, 0.02)
            refused_trace = "12" * 16
            resp = await client.post(
                "/v1/completions",
                json=body,
                headers={"traceparent": f"00-{refused_trace}-{CLIENT_SPAN}-01"},
            )
            assert resp.status_code == 429
            holding.cancel()  # the client goes away: the router abandons the hung engine request
            with contextlib.suppress(asyncio.CancelledError):
                await holding
        spans = spans_of(otel_collector, refused_trace, 2)
    server = one(spans, "POST /v1/completions")
    assert server.attributes["http.response.status_code"] == 429
    assert one(spans, "queue").parent_span_id == server.span_id
    assert {s.name for s in spans} == {"POST /v1/completions", "queue"}  # never routed


def test_simulator_names_a_bad_otlp_endpoint() -> None:
    result = CliRunner().invoke(kvstack_cli, ["engine", "sim", "--otlp-traces-endpoint", "collector:4318"])
    assert result.exit_code != 0
    assert "otlp_traces_endpoint" in result.output
