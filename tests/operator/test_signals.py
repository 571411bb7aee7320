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


def test_queue_wait_reads_the_routers_flow_queue_histogram() -> None:
    q = queries("queueWaitP90", "ns", "m", 60, None)
    assert q.value == (
        "histogram_quantile(0.9, sum by (le) (rate(kvstack_router_flow_queue_wait_seconds_bucket"
        '{namespace="ns",model_name="m"}[60s])))'
    )
    assert (
        q.rate
        == 'sum(rate(kvstack_router_flow_queue_wait_seconds_count{namespace="ns",model_name="m"}[60s]))'
    )


def test_capacity_is_the_most_a_pod_ran_while_requests_waited() -> None:
    q = queries("waitingPerReplica", "ns", "m", 60, None, capacity_s=900, resolution_s=5)
    sel = '{namespace="ns",model_name="m"}'
    running = f"vllm:num_requests_running{sel}"
    assert q.capacity == (
        f"max(max_over_time((({running} and vllm:num_requests_waiting{sel} > 0) or "
        f"({running} and on () (sum(kvstack_router_flow_queue_length{sel}) > 0)))[900s:5s]))"
    )


@pytest.mark.parametrize(
    ("pending", "value"),
    [(None, 2.0), (0.0, 2.0), (6.0, 5.0), (math.nan, 2.0)],
)
def test_the_routers_queue_counts_as_waiting(pending: float | None, value: float) -> None:
    """With flow control the queue forms in the router: its requests wait for these pods too."""
    results = Results({POD_A: 4.0, POD_B: 0.0}, {POD_A: 99.0}, pending=pending)
    assert observation("waitingPerReplica", 100.0, 2, results).value == value


@pytest.mark.parametrize(
    ("metric", "results", "running", "capacity"),
    [
        # per-pod signals: running over the reporting pods, capacity as queried
        (
            "waitingPerReplica",
            Results({POD_A: 0.0}, {POD_A: 99.0}, running={POD_A: 3.0}, capacity=8.0),
            3.0,
            8.0,
        ),
        ("kvCacheUsage", Results({POD_A: 0.5}, {POD_A: 99.0}, running={POD_A: 3.0}, capacity=8.0), 3.0, 8.0),
        # never saturated lately: no capacity, the floor falls back
        (
            "waitingPerReplica",
            Results({POD_A: 0.0}, {POD_A: 99.0}, running={POD_A: 3.0}, capacity=None),
            3.0,
            None,
        ),
        (
            "waitingPerReplica",
            Results({POD_A: 0.0}, {POD_A: 99.0}, running={POD_A: 3.0}, capacity=0.0),
            3.0,
            None,
        ),
        # model-wide latencies: running over all pods, only when every pod reported it
        (
            "queueWaitP90",
            Results(
                {(): 0.2},
                {POD_A: 99.0},
                rate=1.0,
                running={POD_A: 2.0, POD_B: 4.0, ("c", "x"): 0.0},
                capacity=6.0,
            ),
            2.0,
            6.0,
        ),
        (
            "queueWaitP90",
            Results({(): 0.2}, {POD_A: 99.0}, rate=1.0, running={POD_A: 2.0}, capacity=6.0),
            None,
            6.0,
        ),
        (
            "ttftP90",
            Results({(): 0.2}, {POD_A: 99.0}, rate=1.0, running={POD_A: 1.0, POD_B: 2.0, ("c", "x"): 3.0}),
            2.0,
            None,
        ),
    ],
)
def test_running_and_capacity_reach_the_observation(
    metric: str, results: Results, running: float | None, capacity: float | None
) -> None:
    obs = observation(metric, now=100.0, current=3 if "P90" in metric else 1, results=results)  # type: ignore[arg-type]
    assert (obs.running, obs.capacity) == (running, capacity)
