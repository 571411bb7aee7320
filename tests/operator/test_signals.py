"""Pure signal handling: PromQL selectors, turning query results into observations, sustained idleness."""

from __future__ import annotations

import math

import pytest

from kvstack.operator.signals import Results, observation, queries, selector, sustained_idle

POD_A, POD_B = ("a", "10.0.0.1:8000"), ("b", "10.0.0.2:8000")


def test_selector_quotes_label_values() -> None:
    assert selector("ns", 'we"ird\\name') == '{namespace="ns",model_name="we\\"ird\\\\name"}'


def test_queries_per_metric() -> None:
    waiting = queries("waitingPerReplica", "ns", "m", 60, None)
    assert "vllm:num_requests_waiting" in waiting.value and waiting.rate is None
    assert waiting.running is not None and waiting.activity is None
    ttft = queries("ttftP90", "ns", "m", 120, 600)
    assert "histogram_quantile(0.9" in ttft.value and "[120s]" in ttft.value
    assert ttft.rate is not None and ttft.activity is not None and "[600s]" in ttft.activity
    assert "kvstack_router_queued_requests" in ttft.pending


@pytest.mark.parametrize(
    ("metric", "results", "value", "reporting", "running"),
    [
        ("waitingPerReplica", Results({}, {}), None, 0, None),
        ("waitingPerReplica", Results({POD_A: 4.0, POD_B: 0.0}, {POD_A: 99.0}), 2.0, 2, None),
        (
            "waitingPerReplica",
            Results({POD_A: 4.0, POD_B: 0.0}, {POD_A: 99.0}, running={POD_A: 1.0, POD_B: 0.0}),
            2.0,
            2,
            0.5,
        ),
        ("waitingPerReplica", Results({POD_A: math.nan, POD_B: 3.0}, {}), 3.0, 1, None),
        ("kvCacheUsage", Results({POD_A: 0.5}, {POD_A: 99.0}), 0.5, 1, None),
        ("ttftP90", Results({(): 0.8}, {POD_A: 99.0}, rate=2.0), 0.8, 3, None),
        ("ttftP90", Results({(): math.nan}, {POD_A: 99.0}, rate=0.0), 0.0, 3, None),  # idle: no latency
        ("ttftP90", Results({}, {POD_A: 99.0}, rate=None), None, 0, None),
    ],
)
def test_observation(
    metric: str, results: Results, value: float | None, reporting: int, running: float | None
) -> None:
    obs = observation(metric, now=100.0, current=3, results=results)  # type: ignore[arg-type]
    assert (obs.value, obs.reporting, obs.running) == (value, reporting, running)


def test_observation_age_pending_and_idle() -> None:
    obs = observation(
        "waitingPerReplica",
        100.0,
        2,
        Results({POD_A: 1.0}, {POD_A: 70.0, POD_B: 95.0}, pending=2.0, activity=0.0),
    )
    assert obs.age_s == 30.0 and obs.pending == 2.0 and obs.idle is True


@pytest.mark.parametrize(
    ("idle", "since", "now", "result"),
    [
        (None, None, 100.0, (None, None)),
        (False, 50.0, 100.0, (False, None)),
        (True, None, 100.0, (False, 100.0)),  # idle now, but not seen that long
        (True, 80.0, 100.0, (False, 80.0)),
        (True, 70.0, 100.0, (True, 70.0)),
        (None, 70.0, 100.0, (None, None)),  # unknown resets the clock
    ],
)
def test_sustained_idle(
    idle: bool | None, since: float | None, now: float, result: tuple[bool | None, float | None]
) -> None:
    assert sustained_idle(idle, since, now, window_s=30.0) == result
