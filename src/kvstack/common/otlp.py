"""OTLP/HTTP trace export, shared by the router and the simulator.

The OpenTelemetry SDK lives in the ``tracing`` extra and is imported only by :func:`tracer_provider`,
so a process with tracing off never loads it. Each caller gets its own provider (never the global
one): several routers and simulators can run in one test process, each with its own resource.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

TRACES_PATH = "/v1/traces"


def traces_url(endpoint: str) -> str:
    """The URL spans are POSTed to: ``endpoint`` as given, or with ``/v1/traces`` when it has no path.

    As the SDK's own variables: a collector's base URL (``http://otel-collector:4318``) gets the
    traces path, a URL with a path is used as is. Raises ValueError naming what is wrong.
    """
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"must be an http:// or https:// URL of an OTLP/HTTP receiver (got {endpoint!r})")
    if not parts.hostname:
        raise ValueError(f"names no host (got {endpoint!r})")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ValueError(f"has an invalid port (got {endpoint!r})") from None
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + TRACES_PATH
    return endpoint


def sdk_missing() -> str | None:
    """Why the SDK cannot be used (what to install), or None when it can: checked at configuration."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as err:
        return f"needs the OpenTelemetry SDK: pip install 'kvstack[tracing]' ({err.name} is missing)"
    return None


def tracer_provider(
    endpoint: str,
    service_name: str,
    *,
    sample_ratio: float = 1.0,
    headers: Mapping[str, str] | None = None,
) -> TracerProvider:
    """A provider exporting to ``endpoint`` over OTLP/HTTP (protobuf) through a batch span processor.

    Sampling is parent-based: a caller's ``traceparent`` decides for the traces it started (as vLLM
    and every OpenTelemetry SDK do), ``sample_ratio`` for the traces this process starts.
    Shut it down to flush what is still queued. RuntimeError when the SDK is not installed.
    """
    missing = sdk_missing()
    if missing is not None:
        raise RuntimeError(f"tracing {missing}")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        resource=Resource.create({"service.name": service_name}),
        shutdown_on_exit=False,  # the owner shuts it down, flushing its spans, when it stops
    )
    exporter = OTLPSpanExporter(endpoint=traces_url(endpoint), headers=dict(headers or {}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
