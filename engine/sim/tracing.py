"""The simulator's span of each generation request, as vLLM makes with ``--otlp-traces-endpoint``.

vLLM 0.24 reads the request's W3C ``traceparent``/``tracestate`` and records one ``llm_request``
span (SERVER) under it; this wrapper does the same around the simulator's ASGI app, so a local
trace runs client -> router -> engine end to end. Other routes pass through untouched.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from kvstack.common.otlp import tracer_provider

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from kvstack.engine.sim.asgi import Message, Receive, Scope, Send

ASGIApp = Any  # the SimServer, or any ASGI app
TRACED = frozenset({"/v1/completions", "/v1/chat/completions"})
_TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})
_PROPAGATOR = TraceContextTextMapPropagator()


def sim_tracer_provider(endpoint: str) -> TracerProvider:
    """Export to ``endpoint`` as ``$OTEL_SERVICE_NAME`` (the SDK's variable; default ``vllm``)."""
    return tracer_provider(endpoint, os.environ.get("OTEL_SERVICE_NAME") or "vllm")


class TracedApp:
    """``app`` with an ``llm_request`` span per generation request, child of its ``traceparent``."""

    def __init__(self, app: ASGIApp, provider: TracerProvider) -> None:
        self.app = app
        self.tracer = provider.get_tracer("vllm.llm_engine")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in TRACED:
            await self.app(scope, receive, send)
            return
        carrier: dict[str, str] = {}
        request_id = ""
        for name, value in scope["headers"]:
            if name in _TRACE_HEADERS:
                carrier[name.decode("latin-1")] = value.decode("latin-1")
            elif name == b"x-request-id":
                request_id = value.decode("latin-1")
        span = self.tracer.start_span(
            "llm_request",
            context=_PROPAGATOR.extract(carrier),  # without a valid traceparent: a new trace
            kind=SpanKind.SERVER,
            attributes={"gen_ai.request.id": request_id, "url.path": scope["path"]},
        )

        async def traced_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
            await send(message)

        try:
            await self.app(scope, receive, traced_send)
        finally:
            span.end()
