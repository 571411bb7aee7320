"""Per-request traces: the policy's decision line, the join with the client's results, the summary."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from kvstack.bench.driver import RequestResult
from kvstack.bench.trace import (
    chosen_tier,
    moved_turns,
    read_jsonl,
    router_lines,
    summarize,
    trace_row,
    trace_rows,
    write_jsonl,
)
from kvstack.common.kv_events import BlockStored
from kvstack.router.engines import Endpoint, EngineState
from kvstack.router.kvindex.index import KVIndex
from kvstack.router.logs import JsonFormatter
from kvstack.router.policies.base import RequestFeatures
from kvstack.router.policies.cache_aware import CacheAwarePolicy

MODEL, BS = "m", 16
TOKENS = [100 + i % 700 for i in range(1024)]


def engine(i: int) -> EngineState:
    ep = Endpoint(
        url=f"http://e{i}", name=f"e{i}", models=frozenset({MODEL}), kv_events_endpoint=f"tcp://x:{i}"
    )
    return EngineState(endpoint=ep, models=ep.models, block_size=BS, num_gpu_blocks=10_000)


def test_the_policy_logs_each_engines_tiers_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    index = KVIndex()
    engines = [engine(0), engine(1)]
    for e in engines:
        index.ensure_engine(e.url, model=MODEL, block_size=BS)
    # e0 holds the first 512 tokens on its GPU; e1's LMCache offloaded 768 (CPU tier, shared store)
    index.apply("http://e0", [BlockStored(list(range(1, 33)), None, TOKENS[:512], BS)])
    index.apply("http://e1", [BlockStored([99], None, TOKENS[:768], 768, medium="cpu")])
    policy = CacheAwarePolicy(index)
    request = RequestFeatures(model=MODEL, request_id="req-1", prompt_token_ids=TOKENS)

    with caplog.at_level(logging.INFO, logger="kvstack.router.decision"):
        policy.choose(request, engines, 0.0)
    assert not caplog.records  # off unless asked for

    with caplog.at_level(logging.DEBUG, logger="kvstack.router.decision"):
        decision = policy.choose(request, engines, 0.0)
    (record,) = caplog.records
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "req-1"
    assert line["chosen"] == decision.engine.name
    assert line["route_reason"] == decision.reason
    by_engine = {e["engine"]: e for e in line["engines"]}
    assert (by_engine["e0"]["gpu_tokens"], by_engine["e0"]["cpu_tokens"]) == (512, 0)
    assert by_engine["e0"]["shared_tokens"] == 256  # the rest of e1's offload, through Redis
    assert (by_engine["e1"]["gpu_tokens"], by_engine["e1"]["cpu_tokens"]) == (0, 768)


def result(rid: str, sent: float, ttft: float | None, cached: int, ok: bool = True) -> RequestResult:
    return RequestResult(
        "s", 0, sent, ok, ttft=ttft, prompt_tokens=1000, cached_tokens=cached, request_id=rid, engine="e0"
    )


def decision(rid: str, chosen: str, reason: str, gpu: dict[str, int], shared: int = 0) -> str:
    engines = [
        {"engine": name, "gpu_tokens": g, "cpu_tokens": 0, "shared_tokens": shared if g == 0 else 0}
        for name, g in gpu.items()
    ]
    rec = {
        "logger": "kvstack.router.decision",
        "request_id": rid,
        "chosen": chosen,
        "route_reason": reason,
        "engines": engines,
    }
    return json.dumps(rec)


def access(rid: str, route_ms: float) -> str:
    rec = {"logger": "kvstack.router.access", "request_id": rid, "route_ms": route_ms, "route_reason": "x"}
    return json.dumps(rec)


LOG = [
    "not json",
    '{"logger": "uvicorn.error", "msg": "started"}',
    decision("a", "e0", "cache_hit", {"e0": 800, "e1": 0}),
    access("a", 5.0),
    # b's prompt was on e1's GPU, but it went to e0 on the strength of a Redis copy
    decision("b", "e0", "load", {"e0": 0, "e1": 640}, shared=640),
    access("b", 15.0),
    decision("c", "e1", "cold", {"e0": 0, "e1": 0}),
]


def test_router_lines_join_decision_and_access_by_request() -> None:
    lines = router_lines(LOG)
    assert set(lines) == {"a", "b", "c"}
    assert lines["a"]["access"]["route_ms"] == 5.0
    assert lines["b"]["decision"]["chosen"] == "e0"
    assert "access" not in lines["c"]


@pytest.mark.parametrize(
    ("row", "tier"),
    [
        ({"chosen_gpu_tokens": None}, "untraced"),
        ({"chosen_gpu_tokens": 0, "chosen_cpu_tokens": 0, "chosen_shared_tokens": 0}, "none"),
        ({"chosen_gpu_tokens": 16, "chosen_cpu_tokens": 0, "chosen_shared_tokens": 0}, "gpu"),
        ({"chosen_gpu_tokens": 16, "chosen_cpu_tokens": 32, "chosen_shared_tokens": 0}, "cpu"),
        ({"chosen_gpu_tokens": 0, "chosen_cpu_tokens": 0, "chosen_shared_tokens": 64}, "shared"),
    ],
)
def test_chosen_tier(row: dict[str, Any], tier: str) -> None:
    assert chosen_tier(row) == tier


def test_rows_and_summary(tmp_path: Path) -> None:
    results = [
        result("b", 2.0, 1.5, 0),
        result("a", 1.0, 0.105, 800),
        result("c", 3.0, 0.4, 0),
        result("d", 4.0, None, 0, ok=False),  # failed: traced, not summarized
    ]
    rows = trace_rows(results, router_lines(LOG))
    assert [r["request_id"] for r in rows] == ["a", "b", "c", "d"]
    b = rows[1]
    assert (b["chosen_gpu_tokens"], b["chosen_shared_tokens"], b["best_gpu_tokens"]) == (0, 640, 640)
    assert b["route_s"] == pytest.approx(0.015)
    assert rows[3]["route_reason"] is None and rows[3]["predicted"] == []

    path = tmp_path / "t.trace.jsonl"
    write_jsonl(path, rows)
    assert read_jsonl(path) == rows
    packed = tmp_path / "t.trace.jsonl.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    assert read_jsonl(packed) == rows

    s = summarize(rows)
    assert (s["requests"], s["ok"], s["traced"]) == (4, 3, 3)
    assert (s["lost_gpu_decisions"], s["lost_gpu_tokens"]) == (1, 640)
    assert s["lost_gpu_by_reason"] == {"load": 1}
    assert s["lost_gpu_by_chosen_tier"] == {"shared": 1}
    assert s["predicted_gpu_tokens"] == 800
    assert s["engine_cached_tokens"] == 800
    assert s["ttft_p50_s"] == pytest.approx(0.4)
    assert s["route_p50_s"] == pytest.approx(0.010)  # a and b logged their access lines
    assert s["engine_ttft_p50_s"] == pytest.approx((0.1 + 1.485) / 2)
    assert s["by_chosen_tier"]["shared"]["ttft_p50_s"] == pytest.approx(1.5)
    assert s["by_chosen_tier"]["gpu"]["engine_cached_share"] == pytest.approx(0.8)


def test_a_request_the_router_never_logged_is_untraced() -> None:
    row = trace_row(result("z", 0.0, 0.2, 0), None)
    assert row["engine"] == "e0" and row["chosen_gpu_tokens"] is None
    assert summarize([row])["by_chosen_tier"]["untraced"]["requests"] == 1


def turn(session: str, at: float, engine: str | None, ok: bool = True) -> dict[str, Any]:
    return {"session": session, "arrival_s": at, "engine": engine, "ok": ok, "ttft_s": at / 10}


@pytest.mark.parametrize(
    ("rows", "moved"),
    [
        ([], []),
        ([turn("u", 0, "e0"), turn("u", 1, "e0"), turn("v", 2, "e1")], []),  # each stays
        ([turn("u", 0, "e0"), turn("u", 1, "e1"), turn("u", 2, "e1")], [1.0]),  # moved once
        ([turn("u", 1, "e1"), turn("u", 0, "e0")], [1.0]),  # in arrival order, whatever the row order
        ([turn("u", 0, "e0"), turn("u", 1, "e1", ok=False), turn("u", 2, "e0")], []),  # a failed turn
        ([turn("u", 0, "e0"), turn("u", 1, None), turn("u", 2, "e0")], []),  # no engine known
        ([turn("u", 0, "e0"), turn("v", 1, "e1"), turn("u", 2, "e1"), turn("v", 3, "e0")], [2.0, 3.0]),
    ],
)
def test_moved_turns_are_the_ones_sent_away_from_their_sessions_last_engine(
    rows: list[dict[str, Any]], moved: list[float]
) -> None:
    assert [r["arrival_s"] for r in moved_turns(rows)] == moved


def test_the_summary_counts_moved_turns_and_their_ttft() -> None:
    rows = [turn("u", 0, "e0"), turn("u", 1, "e1"), turn("v", 2, "e1"), turn("v", 3, "e0")]
    s = summarize(rows)
    assert (s["moved_turns"], s["moved_ttft_p50_s"]) == (2, pytest.approx(0.2))
