"""The soak benchmark's decisions (``kvstack bench soak``): its request mix and its verdict."""

from __future__ import annotations

from typing import Any

import pytest

from kvstack.bench.soak import Sample, SoakLoad, gauges, minute_rows, request_plan, verdict

LOAD = SoakLoad("http://router", ("http://e0", "http://e1"), seconds=60, rate=10)


@pytest.mark.parametrize(
    ("i", "url", "routed", "stream", "unique"),
    [
        (0, "http://router", True, True, True),
        (1, "http://router", True, False, True),
        (2, "http://router", True, True, False),
        (3, "http://router", True, False, False),
        (9, "http://e1", False, False, True),
        (19, "http://e1", False, False, False),
        (29, "http://e1", False, False, True),
    ],
)
def test_request_plan(i: int, url: str, routed: bool, stream: bool, unique: bool) -> None:
    got_url, body, got_routed = request_plan(i, LOAD)
    assert (got_url, got_routed, body["stream"]) == (url, routed, stream)
    repeated = request_plan(i + 64 * 4 * 10, LOAD)[1]  # the same slot of the mix, 64 prompts later
    assert (body["messages"] != repeated["messages"]) == unique


def test_the_mix_is_half_streaming_half_unique_and_a_tenth_direct() -> None:
    plans = [request_plan(i, LOAD) for i in range(400)]
    assert sum(body["stream"] for _, body, _ in plans) == 200
    assert sum(not routed for _, _, routed in plans) == 40


def _sample(t: float, ms: float, ok: bool = True, routed: bool = True) -> Sample:
    return (t, ms, ok, routed, False, "" if ok else "status 502")


def test_minute_rows_split_by_start_time_and_subtract_the_direct_latency() -> None:
    samples = [_sample(1, 10), _sample(2, 12), _sample(3, 4, routed=False), _sample(61, 20)]
    samples += [_sample(62, 5, routed=False), _sample(63, 99, ok=False)]
    rss = [(0.0, 100.0), (50.0, 101.0), (70.0, 102.0)]
    rows = minute_rows(samples, rss, [(0.0, 1.5), (65.0, 2.5)], minutes=2)
    assert [(r["requests"], r["errors"], r["rss_mb"], r["load_avg_1m"]) for r in rows] == [
        (3, 0, 101.0, 1.5),
        (3, 1, 102.0, 2.5),
    ]
    assert rows[0]["routed_p50_ms"] == 11 and rows[0]["added_p50_ms"] == 7
    assert rows[1]["added_p99_ms"] == 15  # the failed request's latency is not counted


def _rows(rss: list[float], added_p99: list[float]) -> list[dict[str, Any]]:
    return [{"rss_mb": m, "added_p99_ms": a} for m, a in zip(rss, added_p99, strict=True)]


@pytest.mark.parametrize(
    ("rss", "added", "errors", "expected"),
    [
        ([100, 104, 108], [3, 4, 3], {}, (True, True, True)),
        ([100, 105, 111], [3, 4, 3], {}, (True, False, True)),  # 11 % growth
        ([100, 100, 100], [3, 4, 40], {}, (True, True, False)),  # one minute far off
        ([100, 100, 100], [3, 4, 8], {}, (True, True, True)),  # within the 5 ms slack
        ([100, 100, 100], [30, 40, 75], {}, (True, True, True)),  # within twice the median
        ([100, 100, 100], [30, 40, 81], {}, (True, True, False)),
        ([100, 100, 100], [3, 3, 3], {"status 502": 1}, (False, True, True)),
    ],
)
def test_verdict(
    rss: list[float], added: list[float], errors: dict[str, int], expected: tuple[bool, bool, bool]
) -> None:
    got = verdict(_rows(rss, added), 100.0, errors)
    assert (got["zero_errors"], got["rss_growth_ok"], got["p99_stable"]) == expected


def test_gauges_sum_the_bounded_structures_over_labels() -> None:
    text = "\n".join(
        [
            "# HELP kvstack_router_kv_index_blocks Block entries held.",
            'kvstack_router_kv_index_blocks{engine="a"} 10.0',
            'kvstack_router_kv_index_blocks{engine="b"} 5.0',
            "kvstack_router_kv_index_blocks_stored_total 99.0",
            "kvstack_router_kv_index_capacity_blocks 1000.0",
        ]
    )
    assert gauges(text) == {
        "kvstack_router_kv_index_blocks": 15.0,
        "kvstack_router_kv_index_capacity_blocks": 1000.0,
    }
