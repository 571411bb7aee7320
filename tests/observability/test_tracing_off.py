"""Tracing's cost and headers: off makes no span object and adds no header; on, the engine gets the
router's own ``traceparent``; a bad tracing configuration fails at start naming the field."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.trace.span import NonRecordingSpan
from tests.conftest import free_port
from tests.router.conftest import FAST_MONITOR, MODEL, BadEngine, RouterServer
from typer.testing import CliRunner

from kvstack.cli import app as kvstack_cli
from kvstack.common.config import ConfigError
from kvstack.common.waits import wait_until
from kvstack.router.cli import tracing_flags
from kvstack.router.config import load_settings
from kvstack_testing.otelcol import OtelCollector

CLIENT_TRACE, CLIENT_SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


@pytest.fixture
def spans_made(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every span object the OpenTelemetry API or SDK constructs (recording or not)."""
    made = [0]
    for cls in (sdk_trace.Span, NonRecordingSpan):
        original: Callable[..., None] = cls.__init__

        def counting(self: Any, *args: Any, _original: Callable[..., None] = original, **kwargs: Any) -> None:
            made[0] += 1
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counting)
    return made


@pytest.fixture
def engine() -> Iterator[BadEngine]:
    """A real HTTP engine that answers each completion and keeps the headers it got."""
    with BadEngine("no_tokenize") as running:
        yield running


@pytest.fixture
def start(
    otel_collector: OtelCollector, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., RouterServer]]:
    """Starts routers; they stop before the (module's) collector, so their last export finds it."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # the SDK's batch delay, in ms
    started: list[RouterServer] = []

    def make(engine: BadEngine, **values: Any) -> RouterServer:
        settings = load_settings(
            port=free_port(), engines=[engine.url], monitor=FAST_MONITOR, access_log=False, **values
        )
        server = RouterServer(settings).start()
        started.append(server)
        server.wait_available(1)
        return server

    yield make
    for server in started:
        server.stop()


def complete(router: RouterServer, headers: dict[str, str] | None = None) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    resp = httpx.post(f"{router.url}/v1/chat/completions", json=body, headers=headers or {}, timeout=10)
    assert resp.status_code == 200, resp.text


def test_tracing_off_makes_no_span_and_adds_no_header(
    engine: BadEngine, start: Callable[..., RouterServer], spans_made: list[int]
) -> None:
    router = start(engine)
    assert router.ctx.tracing is None
    for _ in range(3):
        complete(router)
    complete(router, {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    assert spans_made == [0]
    assert all("traceparent" not in h and "tracestate" not in h for h in engine.post_headers[:3])
    # a client's own context passes through untouched: the router is not part of the trace
    assert engine.post_headers[3]["traceparent"] == f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


def test_tracing_on_sends_the_router_span_as_the_engine_parent(
    engine: BadEngine,
    start: Callable[..., RouterServer],
    spans_made: list[int],
    otel_collector: OtelCollector,
) -> None:
    router = start(engine, tracing={"enabled": True, "endpoint": otel_collector.url})
    complete(router, {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "tracestate": "vendor=abc"})
    assert spans_made[0] >= 5  # server, queue, tokenize, decide, upstream: the counter sees them
    sent = engine.post_headers[-1]
    version, trace_id, parent, flags = sent["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", CLIENT_TRACE, "01")
    assert sent["tracestate"] == "vendor=abc"
    # the parent the engine was given is the router's upstream span, as exported
    wait_until(
        lambda: any(x.name == "upstream" for x in otel_collector.spans(CLIENT_TRACE)), "the upstream span", 20
    )
    (upstream,) = [x for x in otel_collector.spans(CLIENT_TRACE) if x.name == "upstream"]
    assert parent == upstream.span_id != CLIENT_SPAN
    # without a client context the router starts a trace and still tells the engine
    complete(router)
    started = engine.post_headers[-1]["traceparent"].split("-")
    assert started[1] != CLIENT_TRACE and int(started[3], 16) & 1  # sampled (its other bits: level 2)


@pytest.mark.parametrize(
    "bad", ["garbage", f"00-{'0' * 32}-{CLIENT_SPAN}-01", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}"]
)
def test_a_malformed_client_traceparent_starts_a_new_trace(
    engine: BadEngine, start: Callable[..., RouterServer], otel_collector: OtelCollector, bad: str
) -> None:
    router = start(engine, tracing={"enabled": True, "endpoint": otel_collector.url})
    complete(router, {"traceparent": bad})
    version, trace_id, _, _ = engine.post_headers[-1]["traceparent"].split("-")
    assert version == "00" and len(trace_id) == 32 and trace_id not in (CLIENT_TRACE, "0" * 32)


def test_sampled_out_requests_still_carry_context_to_the_engine(
    engine: BadEngine, start: Callable[..., RouterServer], otel_collector: OtelCollector
) -> None:
    """With sample_ratio 0 the engine is told "not sampled", so it records nothing either."""
    router = start(engine, tracing={"enabled": True, "endpoint": otel_collector.url, "sample_ratio": 0})
    complete(router)
    flags = engine.post_headers[-1]["traceparent"].rsplit("-", 1)[1]
    assert int(flags, 16) & 1 == 0  # the sampled bit is off


def test_a_collector_that_is_down_costs_no_request(
    engine: BadEngine, start: Callable[..., RouterServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")  # seconds the exporter keeps retrying
    router = start(engine, tracing={"enabled": True, "endpoint": f"http://127.0.0.1:{free_port()}"})
    for _ in range(5):
        complete(router)
    assert engine.posts == 5
    router.stop()  # its last export fails, and the router still stops
    assert not router.thread.is_alive()


@pytest.mark.parametrize(
    ("tracing", "named"),
    [
        ({"enabled": True, "endpoint": "collector:4318"}, "tracing.endpoint"),
        ({"endpoint": "ftp://collector"}, "tracing.endpoint"),
        ({"endpoint": "http://:4318"}, "tracing.endpoint"),
        ({"sample_ratio": 1.5}, "tracing.sample_ratio"),
        ({"service_name": ""}, "tracing.service_name"),
        ({"sampling": 1}, "tracing.sampling"),
    ],
)
def test_bad_tracing_config_names_the_field(tracing: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(tracing=tracing)


def test_tracing_without_the_sdk_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes an import fail, as when the tracing extra is not installed
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(ConfigError, match=r"tracing\.enabled: .*pip install 'kvstack\[tracing\]'"):
        load_settings(tracing={"enabled": True})
    assert load_settings(tracing={"enabled": False}).tracing.enabled is False  # off needs nothing


def test_tracing_from_environment_merges_with_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    config = tmp_path / "router.yaml"
    config.write_text("tracing:\n  enabled: true\n  endpoint: http://collector:4318\n")
    monkeypatch.setenv("KVSTACK_ROUTER_TRACING__HEADERS", '{"x-api-key": "secret"}')
    settings = load_settings(config, tracing=tracing_flags(None, None, None, 0.25))
    t = settings.tracing
    assert (t.enabled, t.endpoint, t.sample_ratio, t.headers) == (
        True,
        "http://collector:4318",
        0.25,
        {"x-api-key": "secret"},
    )


def test_tracing_flags() -> None:
    assert tracing_flags(None, None, None, None) is None
    assert tracing_flags(None, "http://c:4318", None, None) == {"enabled": True, "endpoint": "http://c:4318"}
    assert tracing_flags(False, "http://c:4318", "r", 0.5) == {
        "enabled": False,
        "endpoint": "http://c:4318",
        "service_name": "r",
        "sample_ratio": 0.5,
    }
    result = CliRunner().invoke(kvstack_cli, ["router", "--tracing-endpoint", "udp://c:4318"])
    assert result.exit_code != 0
    assert "tracing.endpoint" in result.output
