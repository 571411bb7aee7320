"""The real-cluster autoscaling benchmark's plan and arithmetic. Pure.

What a run is made of (the load step, the simulated pod, the two autoscaling variants as
``spec.autoscaling`` of a KVStack) and what its timeline means (reaction times to the step,
replica-seconds, reversals). The I/O lives in :mod:`kvstack.bench.autoscale_live` and
:mod:`kvstack.bench.autoscale_cluster`.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kvstack.operator.spec import Autoscaling

MODEL = "kvstack/sim-autoscale"
BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class Phases:
    """The offered load over time, in seconds relative to the step (warm-up is negative)."""

    warm_s: float = 20.0
    step_s: float = 140.0  # longer than the scale-down window: steady state under the step shows
    after_s: float = 80.0  # the scale-down window and the steps down
    # Requests per second before and after the step: low enough that a burst seldom fills a pod's
    # 4 slots (which a utilization scaler answers with a pod), so both variants start from one.
    base_rate: float = 0.2
    step_rate: float = 4.5

    def rate(self, t: float) -> float:
        return self.step_rate if 0.0 <= t < self.step_s else self.base_rate

    @property
    def end_s(self) -> float:
        return self.step_s + self.after_s


@dataclass(frozen=True, slots=True)
class PodShape:
    """One simulated engine pod, and the requests sent to it.

    The KV cache holds exactly ``max_num_seqs`` requests of full length, and prompts dominate a
    request's length, so KV-cache usage reads like a CPU's utilization: near 1.0 when the pod is
    saturated, whatever the queue behind it (the HPA-style variant scales on it).
    """

    max_num_seqs: int = 4
    prompt_tokens: int = 480
    max_tokens: int = 32
    speed: float = 0.05  # simulated seconds per wall second: a request takes seconds, not ms

    @property
    def max_model_len(self) -> int:
        """One full-length request, in whole blocks."""
        return BLOCK_SIZE * math.ceil((self.prompt_tokens + self.max_tokens) / BLOCK_SIZE)

    @property
    def num_gpu_blocks(self) -> int:
        return self.max_num_seqs * self.max_model_len // BLOCK_SIZE

    def sim_args(self) -> str:
        return (
            f"--max-num-seqs {self.max_num_seqs} --num-gpu-blocks {self.num_gpu_blocks} "
            f"--max-model-len {self.max_model_len} --speed {self.speed:g} --no-enable-prefix-caching"
        )


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    description: str
    autoscaling: dict[str, Any]  # spec.autoscaling of the KVStack (camelCase)


def _shorten(seconds: float, scale: int) -> int:
    return max(1, round(seconds / scale))


def ours(scale: int) -> Variant:
    """The CRD's autoscaling defaults, every period divided by ``scale``."""
    d = Autoscaling()
    return Variant(
        "kvstack defaults",
        f"{d.metric}, target {d.effective_target:g}, demand-sized; scale down {d.scale_down.max_pods} pod "
        "per evaluation",
        {
            "metric": d.metric,
            "intervalSeconds": _shorten(d.interval_seconds, scale),
            "staleAfterSeconds": _shorten(d.stale_after_seconds, scale),
            "scaleUp": {
                "stabilizationSeconds": round(d.scale_up.stabilization_seconds / scale),
                "maxPercent": d.scale_up.max_percent,
                "maxPods": d.scale_up.max_pods,
            },
            "scaleDown": {
                "stabilizationSeconds": round(d.scale_down.stabilization_seconds / scale),
                "maxPods": d.scale_down.max_pods,
            },
        },
    )


def hpa_style(scale: int, max_replicas: int) -> Variant:
    """The Kubernetes HPA's defaults on a utilization metric, every period divided by ``scale``.

    ``kubectl autoscale``'s default target is 80% CPU; an engine pod's CPU says nothing, so the
    utilization here is KV-cache usage at 0.8. HPA defaults: 15 s sync, tolerance 0.1, scale up
    without stabilization by max(100%, 4 pods) per period, scale down after 300 s by 100% per period.
    """
    return Variant(
        "HPA-style",
        "kvCacheUsage (a utilization, like CPU), target 0.8, plain HPA ratio; scale down 100% per period",
        {
            "metric": "kvCacheUsage",
            "target": 0.8,
            "tolerance": 0.1,
            "intervalSeconds": _shorten(15, scale),
            "staleAfterSeconds": _shorten(60, scale),
            "scaleUp": {"stabilizationSeconds": 0, "maxPercent": 100, "maxPods": 4},
            "scaleDown": {"stabilizationSeconds": round(300 / scale), "maxPods": max_replicas},
        },
    )


def variants(scale: int, max_replicas: int) -> list[Variant]:
    return [ours(scale), hpa_style(scale, max_replicas)]


def stack_spec(variant: Variant, pod: PodShape, min_replicas: int, max_replicas: int) -> dict[str, Any]:
    """The KVStack spec of one run: one model, no router (the benchmark runs its own), no cache."""
    return {
        "models": [
            {
                "name": "llm",
                "model": MODEL,
                "gpus": 1,
                "minReplicas": min_replicas,
                "maxReplicas": max_replicas,
                "podAnnotations": {"sim.kvstack.io/model": MODEL, "sim.kvstack.io/args": pod.sim_args()},
            }
        ],
        "router": {"enabled": False},
        "cache": {"mode": "none"},
        "autoscaling": variant.autoscaling,
    }


@dataclass(frozen=True, slots=True)
class Sample:
    """The fleet at one moment: ``t`` is seconds since the step."""

    t: float
    desired: int  # the Deployment's spec.replicas
    ready: int  # pods Ready in Kubernetes whose simulator answers /health
    serving: int  # of those, pods that have answered at least one request through the router
    rate: float  # offered requests per second
    in_flight: int  # requests sent and not finished
    waiting: float | None = None  # sum of vllm:num_requests_waiting (Prometheus)


@dataclass(frozen=True, slots=True)
class Request:
    sent: float  # seconds since the step
    ok: bool
    first_token: float | None = None
    done: float | None = None
    engine: str = ""


def with_serving(
    samples: Sequence[Sample], ready_pods: Sequence[Sequence[str]], served: Mapping[str, float]
) -> list[Sample]:
    """Samples whose ``serving`` counts the Ready pods that had streamed a first token by then, for a
    request that went on to succeed (``served``: pod -> that time, known only once it finished)."""
    return [
        replace(s, serving=sum(1 for pod in pods if pod in served and served[pod] <= s.t))
        for s, pods in zip(samples, ready_pods, strict=True)
    ]


def first_after(samples: Sequence[Sample], start: float, field: str, above: float) -> float | None:
    """Seconds from ``start`` to the first sample at or after it whose ``field`` exceeds ``above``."""
    for s in samples:
        if s.t >= start and getattr(s, field) > above:
            return round(s.t - start, 2)
    return None


def first_below(samples: Sequence[Sample], start: float, field: str, below: float) -> float | None:
    for s in samples:
        if s.t >= start and getattr(s, field) < below:
            return round(s.t - start, 2)
    return None


def at(samples: Sequence[Sample], t: float) -> Sample:
    """The last sample at or before ``t`` (the first one if none is)."""
    before = [s for s in samples if s.t <= t]
    return before[-1] if before else samples[0]


def reversals(values: Sequence[int]) -> int:
    """Changes of direction (up then down, or down then up) in a series of replica counts."""
    count, last = 0, 0
    for a, b in itertools.pairwise(values):
        if b == a:
            continue
        direction = 1 if b > a else -1
        if last and direction != last:
            count += 1
        last = direction
    return count


def replica_seconds(samples: Sequence[Sample], start: float, end: float) -> float:
    """The integral of desired replicas over [start, end] (what the fleet cost)."""
    total = 0.0
    for a, b in itertools.pairwise(samples):
        lo, hi = max(a.t, start), min(b.t, end)
        if hi > lo:
            total += a.desired * (hi - lo)
    return round(total, 1)


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1], 3)


def summarize(samples: Sequence[Sample], requests: Sequence[Request], phases: Phases) -> dict[str, Any]:
    """Reaction times to the step and what the fleet did, from one run's timeline."""
    if not samples:
        raise ValueError("no samples")
    before = at(samples, 0.0)
    in_step = [s for s in samples if 0.0 <= s.t < phases.step_s]
    peak = max((s.desired for s in in_step), default=before.desired)
    drop = at(samples, phases.step_s)
    step_requests = [r for r in requests if 0.0 <= r.sent < phases.step_s]
    ttfts = [r.first_token - r.sent for r in step_requests if r.ok and r.first_token is not None]
    return {
        "replicas_before": before.desired,
        "peak_replicas": peak,
        # (a) the operator wrote a larger spec.replicas; (b) a new pod is Ready and answers;
        # (c) a new pod answered a request sent through the router
        "decision_s": first_after(samples, 0.0, "desired", before.desired),
        "ready_s": first_after(samples, 0.0, "ready", before.ready),
        # More pods have served than existed before the step, so a new one has. Counting from
        # `before.serving` took a pre-step pod that had not answered yet by the step for a new one.
        "serving_s": first_after(samples, 0.0, "serving", before.ready),
        # every pod of the peak Ready, and serving
        "all_ready_s": first_after(samples, 0.0, "ready", peak - 1) if peak > before.desired else None,
        "all_serving_s": first_after(samples, 0.0, "serving", peak - 1) if peak > before.desired else None,
        "scale_down_s": first_below(samples, phases.step_s, "desired", drop.desired),
        "back_to_min_s": first_below(samples, phases.step_s, "desired", before.desired + 1),
        "reversals": reversals([s.desired for s in samples if s.t >= 0.0]),
        "replica_seconds": replica_seconds(samples, 0.0, phases.end_s),
        "requests": len(requests),
        "errors": sum(1 for r in requests if not r.ok),
        "step_ttft_p50_s": _quantile(ttfts, 0.5),
        "step_ttft_p90_s": _quantile(ttfts, 0.9),
    }
