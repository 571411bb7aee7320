"""A real OpenTelemetry Collector on loopback, for tests of the spans the router and simulator export.

The binary is built by ``cluster/build.sh otelcol`` from ``cluster/otelcol/manifest.yaml``: the core
OTLP receiver (HTTP and gRPC on free ports), contrib's attributes processor and file exporter. Every
export the collector accepts is written by the file exporter as one OTLP JSON line, which
:meth:`OtelCollector.spans` parses back, so what a test asserts on is what a collector received.

OTLP JSON differs from the protobuf wire form in ways the parser handles: trace and span ids are
lowercase hex strings, 64-bit integers (``intValue``, ``*TimeUnixNano``) are decimal strings, and
fields at their default (a root span's ``parentSpanId``, status code 0) are left out.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstack.common.waits import wait_until
from kvstack_testing.tools import Toolchain

SPAN_KIND_SERVER, SPAN_KIND_CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
STATUS_ERROR = 2  # opentelemetry.proto.trace.v1.Status.StatusCode
# The attribute the collector copies an export request's header ``h`` into (see collector_config).
HEADER_ATTRIBUTE = "collector.request.header.{}"


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as a receiver got it (the collector, or kvstack_testing.otlp); ids in lowercase hex,
    as in a ``traceparent``."""

    service: str  # the resource's service.name
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    kind: int
    attributes: dict[str, Any]
    events: tuple[str, ...]
    status_code: int
    start_ns: int
    end_ns: int


def collector_config(
    http_port: int, grpc_port: int, output: Path, record_headers: Sequence[str] = ()
) -> dict[str, Any]:
    """The collector's configuration: OTLP in on loopback, every span out to ``output`` as JSON lines.

    Each header in ``record_headers`` that an export request carried is copied onto its spans as the
    attribute ``HEADER_ATTRIBUTE.format(header)`` (the receiver keeps request headers as client
    metadata with ``include_metadata``; the attributes processor reads them ``from_context``).
    """
    actions = [
        {"key": HEADER_ATTRIBUTE.format(h), "from_context": f"metadata.{h}", "action": "insert"}
        for h in record_headers
    ]
    processors = ["attributes/headers"] if actions else []
    return {
        "receivers": {
            "otlp": {
                "protocols": {
                    "http": {"endpoint": f"127.0.0.1:{http_port}", "include_metadata": True},
                    "grpc": {"endpoint": f"127.0.0.1:{grpc_port}", "include_metadata": True},
                }
            }
        },
        "processors": {"attributes/headers": {"actions": actions}} if actions else {},
        # flushed every 50 ms rather than each second, so a test's wait for its spans is short
        "exporters": {"file": {"path": str(output), "format": "json", "flush_interval": "50ms"}},
        "service": {
            "pipelines": {"traces": {"receivers": ["otlp"], "processors": processors, "exporters": ["file"]}},
            # no self-monitoring endpoint: its fixed port (8888) would clash between test runs
            "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "warn"}},
        },
    }


def _value(v: dict[str, Any]) -> Any:
    """An OTLP JSON ``AnyValue`` as Python (``intValue`` is a decimal string there)."""
    if "intValue" in v:
        return int(v["intValue"])
    if "arrayValue" in v:
        return [_value(x) for x in v["arrayValue"].get("values", [])]
    for key in ("stringValue", "boolValue", "doubleValue", "bytesValue"):
        if key in v:
            return v[key]
    return None


def _attributes(pairs: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {kv["key"]: _value(kv.get("value", {})) for kv in pairs or []}


def parse_export(line: str) -> list[ReceivedSpan]:
    """The spans of one line of the file exporter: an ``ExportTraceServiceRequest`` in OTLP JSON."""
    spans = []
    for resource_spans in json.loads(line).get("resourceSpans", []):
        resource = _attributes(resource_spans.get("resource", {}).get("attributes"))
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.get("scopeSpans", []):
            for s in scope_spans.get("spans", []):
                spans.append(
                    ReceivedSpan(
                        service=service,
                        name=s["name"],
                        trace_id=s["traceId"],
                        span_id=s["spanId"],
                        parent_span_id=s.get("parentSpanId", ""),
                        kind=int(s.get("kind", 0)),
                        attributes=_attributes(s.get("attributes")),
                        events=tuple(e["name"] for e in s.get("events", [])),
                        status_code=int(s.get("status", {}).get("code", 0)),
                        start_ns=int(s.get("startTimeUnixNano", 0)),
                        end_ns=int(s.get("endTimeUnixNano", 0)),
                    )
                )
    return spans


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class OtelCollector:
    """A running collector process; :meth:`spans` is everything it has exported so far."""

    def __init__(self, binary: Path, workdir: Path, record_headers: Sequence[str] = ()) -> None:
        self.http_port, self.grpc_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"  # OTLP/HTTP base URL: exporters add /v1/traces
        self.grpc_endpoint = f"http://127.0.0.1:{self.grpc_port}"
        self.output = workdir / "spans.jsonl"
        self.log = workdir / "otelcol.log"
        config = workdir / "otelcol.yaml"  # JSON is YAML
        config.write_text(
            json.dumps(collector_config(self.http_port, self.grpc_port, self.output, record_headers))
        )
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(binary), "--config", f"file:{config}"], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_until(self._ready, "the collector's OTLP ports", 30, 0.05)
        except BaseException:
            self.close()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"otelcol exited with {self.proc.returncode}:\n{self.log.read_text()}")
        return _listening(self.http_port) and _listening(self.grpc_port)

    def spans(self, trace_id: str | None = None) -> list[ReceivedSpan]:
        """Every span of the complete lines written so far (the last line may still be partial)."""
        try:
            text = self.output.read_text()
        except FileNotFoundError:  # nothing exported yet
            return []
        lines = text.split("\n")[:-1]  # what follows the last newline is not written out yet
        return [s for line in lines if line for s in parse_export(line) if trace_id in (None, s.trace_id)]

    def close(self) -> None:
        """Stops the collector the way Kubernetes does (SIGTERM), so it flushes what it holds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def collector_process(
    workdir: Path, record_headers: Sequence[str] = (), binary: Path | None = None
) -> Iterator[OtelCollector]:
    """A collector writing under ``workdir``; the binary defaults to the one ``cluster/build.sh`` built."""
    path = binary or Toolchain.load().otelcol
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{path} is not built: run cluster/build.sh otelcol")
    collector = OtelCollector(path, workdir, record_headers)
    try:
        yield collector
    finally:
        collector.close()
