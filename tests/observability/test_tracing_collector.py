"""The collector harness's own pure parts: the configuration it runs and its OTLP JSON parser.

The JSON line below is in the file exporter's shape (OTLP JSON: hex ids, 64-bit integers as decimal
strings, default-valued fields left out); the tracing tests read the real collector's output.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvstack_testing.otelcol import (
    HEADER_ATTRIBUTE,
    SPAN_KIND_CLIENT,
    STATUS_ERROR,
    ReceivedSpan,
    collector_config,
    parse_export,
)

EXPORT = {
    "resourceSpans": [
        {
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "kvstack-router"}}]},
            "scopeSpans": [
                {
                    "scope": {"name": "kvstack.router"},
                    "spans": [
                        {
                            "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
                            "spanId": "00f067aa0ba902b7",
                            "name": "root",
                            "kind": 2,
                            "startTimeUnixNano": "1796428192530821617",
                            "endTimeUnixNano": "1796428192537076460",
                            "status": {},
                        },
                        {
                            "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
                            "spanId": "aaede59d34ab7b6a",
                            "parentSpanId": "00f067aa0ba902b7",
                            "name": "upstream",
                            "kind": 3,
                            "startTimeUnixNano": "1796428192530928978",
                            "endTimeUnixNano": "1796428192530961639",
                            "attributes": [
                                {"key": "kvstack.attempt", "value": {"intValue": "2"}},
                                {"key": "retried", "value": {"boolValue": True}},
                                {"key": "ratio", "value": {"doubleValue": 0.5}},
                                {"key": "tags", "value": {"arrayValue": {"values": [{"stringValue": "a"}]}}},
                            ],
                            "events": [{"timeUnixNano": "1796428192530950000", "name": "first_byte"}],
                            "status": {"code": 2, "message": "status"},
                        },
                    ],
                }
            ],
        }
    ]
}


def test_parse_export_reads_otlp_json() -> None:
    root, upstream = parse_export(json.dumps(EXPORT))
    assert root == ReceivedSpan(
        service="kvstack-router",
        name="root",
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        span_id="00f067aa0ba902b7",
        parent_span_id="",  # left out of the JSON: a root span
        kind=2,
        attributes={},
        events=(),
        status_code=0,  # left out: unset
        start_ns=1796428192530821617,
        end_ns=1796428192537076460,
    )
    assert (upstream.parent_span_id, upstream.kind, upstream.status_code) == (
        "00f067aa0ba902b7",
        SPAN_KIND_CLIENT,
        STATUS_ERROR,
    )
    assert upstream.attributes == {"kvstack.attempt": 2, "retried": True, "ratio": 0.5, "tags": ["a"]}
    assert upstream.events == ("first_byte",)


def test_parse_export_of_an_empty_export() -> None:
    assert parse_export("{}") == []


def test_collector_config_records_the_named_headers() -> None:
    config = collector_config(4318, 4317, Path("/tmp/spans.jsonl"), ("x-api-key",))
    http = config["receivers"]["otlp"]["protocols"]["http"]
    assert http == {"endpoint": "127.0.0.1:4318", "include_metadata": True}
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "127.0.0.1:4317"
    (action,) = config["processors"]["attributes/headers"]["actions"]
    assert action == {
        "key": HEADER_ATTRIBUTE.format("x-api-key"),
        "from_context": "metadata.x-api-key",
        "action": "insert",
    }
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline == {"receivers": ["otlp"], "processors": ["attributes/headers"], "exporters": ["file"]}
    assert config["exporters"]["file"]["path"] == "/tmp/spans.jsonl"


def test_collector_config_without_headers_has_no_processor() -> None:
    config = collector_config(1, 2, Path("out"))
    assert config["processors"] == {}
    assert config["service"]["pipelines"]["traces"]["processors"] == []
