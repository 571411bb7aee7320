"""PromQL for the autoscaling signals, and turning query results into an Observation. Pure.

Engine series carry ``model_name`` (the first served name, as vLLM labels them) and the
``namespace`` of their pod; per-pod signals are grouped by ``pod`` and ``instance`` so that the
number of reporting pods can be compared with the Deployment's replicas (partial data).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from kvstack.operator.autoscale import Observation, Signal
from kvstack.operator.spec import Metric

SIGNALS: dict[Metric, Signal] = {
    "waitingPerReplica": "waiting",
    "kvCacheUsage": "kv_usage",
    "ttftP90": "ttft",
    "queueWaitP90": "queue_wait",
}
# The contract's `signal` label of kvstack_operator_scaling_signal, per metric.
SIGNAL_LABELS: dict[Signal, str] = {
    "waiting": "waiting_per_replica",
    "kv_usage": "kv_usage",
    "ttft": "ttft_p90_seconds",
    "queue_wait": "queue_wait_p90_seconds",
}
# The router's flow-control queue wait, a histogram by model_name and class (the flow branch's
# router/metrics.py exports it); the queueWaitP90 signal is its p90 over all classes.
FLOW_QUEUE_WAIT = "kvstack_router_flow_queue_wait_seconds"
FLOW_QUEUE = "kvstack_router_flow_queue_length"  # by model_name, class, tenant
# How far back a saturated pod's running count is remembered (the capacity the scale-down floor
# divides demand by): longer than the default scale-down window, so the peak that grew the fleet
# is still known when it steps down.
CAPACITY_LOOKBACK_S = 1800
_BY_POD = "sum by (pod, instance)"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def selector(namespace: str, model_name: str) -> str:
    return f"{{namespace={_quote(namespace)},model_name={_quote(model_name)}}}"


@dataclass(frozen=True, slots=True)
class Queries:
    """The instant queries of one evaluation of one model."""

    value: str  # per pod (waiting, kv) or one series (ttft)
    stamps: str  # per pod: the time of the newest sample, to tell stale data
    rate: str | None  # ttft only: requests per second; 0 means idle, not unknown
    pending: str  # requests the router holds for the model
    activity: str | None  # scale to zero: requests over the idle window, plus in flight
    running: str | None = None  # running requests per pod (the scale-down floor's demand)
    capacity: str | None = None  # the most requests one pod ran while others waited (its capacity)


def queries(
    metric: Metric,
    namespace: str,
    model_name: str,
    window_s: int,
    idle_s: int | None,
    capacity_s: int = CAPACITY_LOOKBACK_S,
    resolution_s: int = 15,
) -> Queries:
    sel = selector(namespace, model_name)
    gauge = "vllm:kv_cache_usage_perc" if metric == "kvCacheUsage" else "vllm:num_requests_waiting"
    stamps = f"max by (pod, instance) (timestamp(vllm:num_requests_running{sel}))"
    rate: str | None = None
    if metric in ("ttftP90", "queueWaitP90"):
        # A model-wide latency: the engines' TTFT, or the router's flow-queue wait.
        hist = "vllm:time_to_first_token_seconds" if metric == "ttftP90" else FLOW_QUEUE_WAIT
        value = f"histogram_quantile(0.9, sum by (le) (rate({hist}_bucket{sel}[{window_s}s])))"
        rate = f"sum(rate({hist}_count{sel}[{window_s}s]))"
    else:
        value = f"{_BY_POD} ({gauge}{sel})"
    router_sel = selector(namespace, model_name)
    pending = f"sum(kvstack_router_queued_requests{router_sel})"
    activity = None
    if idle_s is not None:
        activity = (
            f"sum(increase(vllm:request_success_total{sel}[{idle_s}s]))"
            f" + sum(vllm:num_requests_running{sel}) + sum(vllm:num_requests_waiting{sel})"
        )
    running = f"{_BY_POD} (vllm:num_requests_running{sel})"
    # A pod is saturated while requests wait behind it: its running count then is what it holds
    # (max_num_seqs or its KV cache, whichever binds). The max over pods and the look-back window,
    # sampled every evaluation interval (a subquery's default step, the global evaluation interval,
    # may be a minute and miss a short saturation).
    # With the router's flow control the queue forms in the router instead (the engines' own stays
    # empty): its flow queue for the model counts as requests waiting behind every pod.
    running_now = f"vllm:num_requests_running{sel}"
    saturated = (
        f"({running_now} and vllm:num_requests_waiting{sel} > 0)"
        f" or ({running_now} and on () (sum({FLOW_QUEUE}{sel}) > 0))"
    )
    capacity = f"max(max_over_time(({saturated})[{capacity_s}s:{resolution_s}s]))"
    return Queries(value, stamps, rate, pending, activity, running, capacity)


PodKey = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Results:
    """What the queries returned; ``None`` for a query with no series."""

    values: Mapping[PodKey, float]
    stamps: Mapping[PodKey, float]
    rate: float | None = None
    pending: float | None = None
    activity: float | None = None
    running: Mapping[PodKey, float] | None = None
    capacity: float | None = None


def observation(metric: Metric, now: float, current: int, results: Results) -> Observation:
    """The Observation for :func:`kvstack.operator.autoscale.decide`."""
    values = {k: v for k, v in results.values.items() if not math.isnan(v)}
    age = now - min(results.stamps.values()) if results.stamps else 0.0
    idle = None if results.activity is None or math.isnan(results.activity) else results.activity == 0
    pending = results.pending
    capacity = results.capacity if results.capacity is not None and results.capacity > 0 else None
    if metric in ("ttftP90", "queueWaitP90"):
        if results.rate == 0.0:
            value: float | None = 0.0  # no requests: no latency to speak of, and idle
        else:
            value = next(iter(values.values()), None)
        reporting = current if value is not None and results.stamps else 0
        # A model-wide value: the floor needs every pod's running count.
        running_all = results.running or {}
        mean = sum(running_all.values()) / current if current and len(running_all) == current else None
        return Observation(now, current, value, reporting, max(age, 0.0), pending, idle, mean, capacity)
    if not values:
        return Observation(now, current, None, 0, 0.0, pending, idle)
    mean = sum(values.values()) / len(values)
    if metric == "waitingPerReplica" and pending is not None and not math.isnan(pending):
        # Requests the router holds for the model (its flow queue, or a scale-from-zero hold) wait
        # for these pods as much as their own queues' do: with flow control on, they are the queue.
        mean += pending / len(values)
    running = None
    if results.running is not None and all(k in results.running for k in values):
        running = sum(results.running[k] for k in values) / len(values)
    return Observation(now, current, mean, len(values), max(age, 0.0), pending, idle, running, capacity)


def sustained_idle(
    idle: bool | None, since: float | None, now: float, window_s: float
) -> tuple[bool | None, float | None]:
    """``(idle for the whole window, new idle-since)``: the query only sees the data it has (a
    series younger than the window looks idle), so the operator must also have seen it idle that long.
    """
    if idle is not True:
        return idle, None
    start = now if since is None else since
    return now - start >= window_s, start
