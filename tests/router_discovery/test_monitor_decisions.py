"""The monitor's pure decisions: probe hysteresis, staleness, model lists, config."""

from __future__ import annotations

from typing import Any

import pytest

from kvstack.common.config import ConfigError, build
from kvstack.router.engines import Endpoint, EngineState
from kvstack.router.monitor import MonitorConfig, apply_metrics, clear_metrics, model_ids, scrape_is_fresh
from kvstack.router.probe_rules import ProbeResult, ProbeTrack, judge_probe, probe_result
from kvstack.router.scrape import EngineMetrics, ModelMetrics

RESULTS: dict[str, ProbeResult] = {"+": "ok", "-": "failed", "~": "busy"}


def run(results: str, *, healthy: bool = True, n: int = 3, m: int = 2) -> str:
    """Feed probe results ('+' ok, '-' failed, '~' busy) and return the health after each: 'H' or 'U'."""
    track = ProbeTrack()
    out = []
    for r in results:
        result = RESULTS[r]
        v = judge_probe(track, result=result, healthy=healthy, unhealthy_threshold=n, healthy_threshold=m)
        track, healthy = v.track, v.healthy
        out.append("H" if healthy else "U")
    return "".join(out)


@pytest.mark.parametrize(
    ("results", "kwargs", "expected"),
    [
        pytest.param("+++", {}, "HHH", id="stays-healthy"),
        pytest.param("-", {}, "U", id="first-probe-decides"),
        pytest.param("-+", {}, "UU", id="one-success-not-enough"),
        pytest.param("-++", {}, "UUH", id="m-successes-bring-it-back"),
        pytest.param("+--", {}, "HHH", id="below-n-failures"),
        pytest.param("+---", {}, "HHHU", id="n-failures-mark-unhealthy"),
        pytest.param("+--+--", {}, "HHHHHH", id="failures-must-be-consecutive"),
        pytest.param("+---+-++", {}, "HHHUUUUH", id="successes-must-be-consecutive"),
        pytest.param("+-", {"n": 1}, "HU", id="n-is-1"),
        pytest.param("-+", {"m": 1}, "UH", id="m-is-1"),
        pytest.param("+~~~~~", {}, "HHHHHH", id="busy-never-marks-unhealthy"),
        pytest.param("+--~-", {}, "HHHHU", id="busy-keeps-the-failure-streak"),
        pytest.param("+-~-~+---", {}, "HHHHHHHHU", id="busy-between-failures-still-consecutive"),
        pytest.param("-~~~", {}, "UUUU", id="busy-never-brings-it-back"),
        pytest.param("-+~+", {}, "UUUH", id="busy-keeps-the-success-streak"),
        pytest.param("~-", {"n": 1}, "HU", id="a-busy-first-probe-decides-nothing"),
    ],
)
def test_judge_probe(results: str, kwargs: dict[str, Any], expected: str) -> None:
    assert run(results, **kwargs) == expected


@pytest.mark.parametrize(
    ("answered", "timed_out", "last_answer", "now", "expected"),
    [
        (True, False, 0.0, 100.0, "ok"),
        (True, False, 99.0, 100.0, "ok"),
        (False, False, 99.0, 100.0, "failed"),  # refused or a 5xx: no answer can excuse that
        (False, True, 0.0, 100.0, "failed"),  # never answered us
        (False, True, 97.0, 100.0, "busy"),  # answered within the window (3 s)
        (False, True, 96.99, 100.0, "failed"),  # its last answer is older: frozen, not busy
    ],
)
def test_probe_result(answered: bool, timed_out: bool, last_answer: float, now: float, expected: str) -> None:
    got = probe_result(answered=answered, timed_out=timed_out, last_answer=last_answer, now=now, window=3.0)
    assert got == expected


def engine() -> EngineState:
    return EngineState(endpoint=Endpoint("http://127.0.0.1:1", "e"), models=frozenset({"m"}))


@pytest.mark.parametrize(
    ("last_scrape", "now", "fresh"),
    [(0.0, 1.0, False), (10.0, 10.0, True), (10.0, 13.0, True), (10.0, 13.01, False)],
)
def test_scrape_is_fresh(last_scrape: float, now: float, fresh: bool) -> None:
    st = engine()
    st.last_scrape = last_scrape
    assert scrape_is_fresh(st, now, 3.0) is fresh


def test_apply_and_clear_metrics() -> None:
    st = engine()
    metrics = EngineMetrics(
        num_running=3,
        num_waiting=1,
        kv_cache_usage=0.5,
        block_size=16,
        num_gpu_blocks=100,
        counters={"prefix_cache_hits": 7},
        by_model={"a": ModelMetrics(1, 0, 0.5), "b": ModelMetrics(2, 1, 0.25)},
    )
    apply_metrics(st, metrics, now=42.0)
    assert (st.num_running, st.num_waiting, st.kv_cache_usage) == (3, 1, 0.5)
    assert (st.block_size, st.num_gpu_blocks, st.last_scrape) == (16, 100, 42.0)
    assert st.extra["prefix_cache_hits"] == 7
    assert st.extra["num_running:b"] == 2
    assert st.load == 4
    clear_metrics(st)
    assert (st.num_running, st.num_waiting, st.kv_cache_usage, st.extra) == (None, None, None, {})
    assert st.block_size == 16  # cache geometry does not go stale
    assert st.load == 0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"object": "list", "data": []}, frozenset()),
        (
            {"object": "list", "data": [{"id": "a", "root": "a"}, {"id": "lora", "parent": "a"}]},
            {"a", "lora"},
        ),
        ({"data": [{"id": ""}, {"name": "x"}, "junk", {"id": "b"}]}, {"b"}),
    ],
)
def test_model_ids(body: Any, expected: frozenset[str]) -> None:
    assert model_ids(body) == expected


@pytest.mark.parametrize("body", [[], {"data": "x"}, {"object": "list"}, "text"])
def test_model_ids_rejects(body: Any) -> None:
    with pytest.raises(ValueError):
        model_ids(body)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"probe_interval": 0}, "probe_interval"),
        ({"unhealthy_threshold": 0}, "unhealthy_threshold"),
        ({"scrape_timeout": -1}, "scrape_timeout"),
        ({"scrape_interval": 2, "stale_after": 1}, "stale_after"),
        ({"probe_intervall": 1}, "probe_intervall"),
    ],
)
def test_bad_config_names_the_field(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        build(MonitorConfig, "router monitor", **fields)


def test_max_scrape_age() -> None:
    assert MonitorConfig(scrape_interval=2).max_scrape_age == 6
    assert MonitorConfig(scrape_interval=2, stale_after=10).max_scrape_age == 10
