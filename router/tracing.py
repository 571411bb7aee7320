"""OTLP tracing of proxied requests: W3C trace context in, spans out, ``traceparent`` to the engine.

One :class:`RequestTrace` per request, carried on the proxy's ``Call``; the proxy tells it what
happened and it makes the spans, all children of one server span::

    POST /v1/chat/completions   (SERVER; the client's traceparent is its parent, when sent)
    ├── queue      admission: the scale-from-zero hold and the model's queue
    ├── tokenize   the prompt tokens the policy asked for (none asked: a zero-length span)
    ├── decide     the policy's choice: engine, policy, reason, predicted hit tokens; per try
    └── upstream   (CLIENT) the engine exchange, per try; its context goes to the engine as
                   ``traceparent``, so vLLM (``--otlp-traces-endpoint``) continues the trace.
                   Its ``first_byte`` event marks the response's first byte going to the client.

``queue``, ``tokenize`` and ``decide`` are recorded after the fact from measured durations: the
proxy's path keeps its shape, and what is not traced costs nothing. With tracing off the router has
no :class:`RouterTracing` at all, the proxy checks ``call.trace is None``, and no span object is
made (tests/observability/test_tracing_off.py counts them). The OpenTelemetry SDK is imported only
when tracing is on. Spans never become the "current" span of a context variable: every parent is
passed explicitly, so concurrent requests on one event loop cannot mix their traces.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from kvstack.common.otlp import tracer_provider

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.util.types import Attributes

    from kvstack.router.config import TracingConfig
    from kvstack.router.exchange import Exchange
    from kvstack.router.policies.base import Decision
    from kvstack.router.retry import AttemptFailure

Headers = list[tuple[bytes, bytes]]

TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})
_PROPAGATOR = TraceContextTextMapPropagator()


class RouterTracing:
    """The router's tracer: one per app, started with it, shut down (flushing spans) with it."""

    def __init__(self, config: TracingConfig) -> None:
        self.provider: TracerProvider = tracer_provider(
            config.endpoint, config.service_name, sample_ratio=config.sample_ratio, headers=config.headers
        )
        self.tracer = self.provider.get_tracer("kvstack.router")

    def begin(self, method: str, path: str, headers: Headers, request_id: str) -> RequestTrace:
        """The trace of one request, its server span started now as a child of the client's context."""
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k in TRACE_HEADERS}
        span = self.tracer.start_span(
            f"{method} {path}",
            context=_PROPAGATOR.extract(carrier),  # without a valid traceparent: empty, so a new trace
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path, "kvstack.request_id": request_id},
        )
        return RequestTrace(self.tracer, span)

    def shutdown(self) -> None:
        """Export what is queued and stop (the batch processor's thread ends)."""
        self.provider.shutdown()


class RequestTrace:
    """The spans of one proxied request; the proxy reports each step here."""

    __slots__ = ("_context", "_queued", "_tracer", "_upstream", "server")

    def __init__(self, tracer: trace.Tracer, server: trace.Span) -> None:
        self._tracer = tracer
        self.server = server
        self._context: Context = trace.set_span_in_context(server)
        self._upstream: trace.Span | None = None
        self._queued = False

    def _recorded(self, name: str, seconds: float, attributes: Attributes = None) -> None:
        end = time.time_ns()
        span = self._tracer.start_span(
            name, context=self._context, start_time=end - int(seconds * 1e9), attributes=attributes
        )
        span.end(end_time=end)

    def queued(self, seconds: float) -> None:
        """Admission took ``seconds`` (recorded once: a held request routed again is not queued again)."""
        if not self._queued:
            self._queued = True
            self._recorded("queue", seconds)

    def tokenized(self, seconds: float, prompt_tokens: int | None) -> None:
        attributes = None if prompt_tokens is None else {"kvstack.prompt_tokens": prompt_tokens}
        self._recorded("tokenize", seconds, attributes)

    def decided(self, seconds: float, decision: Decision, policy: str) -> None:
        attributes: Attributes = {
            "kvstack.engine": decision.engine.name,
            "kvstack.policy": policy,
            "kvstack.reason": decision.reason,
            "kvstack.predicted_hit_tokens": decision.predicted_hit_tokens,
        }
        self._recorded("decide", seconds, attributes)

    def upstream_started(self, decision: Decision, url: str, attempt: int) -> None:
        """A try on ``decision.engine`` begins: its span is the parent the engine is told of."""
        self._upstream = self._tracer.start_span(
            "upstream",
            context=self._context,
            kind=SpanKind.CLIENT,
            attributes={"kvstack.engine": decision.engine.name, "url.full": url, "kvstack.attempt": attempt},
        )

    def upstream_headers(self, headers: Headers) -> Headers:
        """``headers`` with the client's trace context replaced by the current try's."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(self._upstream or self.server))
        kept = [(k, v) for k, v in headers if k not in TRACE_HEADERS]
        return kept + [(k.encode("latin-1"), v.encode("latin-1")) for k, v in carrier.items()]

    def first_byte(self, status: int) -> None:
        """The response's head goes to the client now (a stream's: with its first generated token)."""
        span = self._upstream or self.server
        span.add_event("first_byte", {"http.response.status_code": status})

    def upstream_ended(self, failure: AttemptFailure | None, ended: bool) -> None:
        """The try is over: answered (``failure`` None), failed, or cut short (``ended`` False)."""
        span, self._upstream = self._upstream, None
        if span is None:
            return
        if failure is not None:
            span.set_attributes(
                {"kvstack.failure": failure.kind, "http.response.status_code": failure.status}
            )
            span.set_status(Status(StatusCode.ERROR, failure.message))
        elif not ended:
            span.set_attribute("kvstack.failure", "cancelled")
        span.end()

    def finish(self, ex: Exchange) -> None:
        """End the server span with the request's outcome."""
        span = self.server
        attributes: Mapping[str, str | int | bool] = {
            "http.response.status_code": ex.status,
            "gen_ai.request.model": ex.model,
            "kvstack.engine": ex.engine,
            "kvstack.attempts": ex.attempts,
            "kvstack.stream": ex.stream,
        }
        span.set_attributes(attributes)
        if ex.status >= 500:
            span.set_status(Status(StatusCode.ERROR, ex.error or f"status {ex.status}"))
        span.end()
