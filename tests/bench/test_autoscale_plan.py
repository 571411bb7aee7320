"""The real-cluster autoscaling benchmark's plan and arithmetic: variants, load, reaction times."""

from __future__ import annotations

import random

import pytest

from kvstack.bench.autoscale_live import arrivals, prompt
from kvstack.bench.autoscale_plan import (
    Phases,
    PodShape,
    Request,
    Sample,
    hpa_style,
    ours,
    replica_seconds,
    reversals,
    stack_spec,
    summarize,
    variants,
    with_serving,
)
from kvstack.common.tokenizer import encode
from kvstack.operator.spec import Autoscaling, parse_spec


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], 0),
        ([1, 1, 1], 0),
        ([1, 2, 3, 3], 0),  # only up
        ([1, 3, 2, 1], 1),  # up, then down: one load pulse
        ([1, 3, 1, 3, 1], 3),  # flapping
        ([4, 3, 3, 2], 0),  # only down
        ([2, 1, 2], 1),
    ],
)
def test_reversals_count_changes_of_direction(values: list[int], expected: int) -> None:
    assert reversals(values) == expected


def _samples(rows: list[tuple[float, int, int, int]]) -> list[Sample]:
    return [Sample(t=t, desired=d, ready=r, serving=s, rate=1.0, in_flight=0) for t, d, r, s in rows]


@pytest.mark.parametrize(
    ("rows", "start", "end", "expected"),
    [
        ([(0, 1, 1, 1), (10, 1, 1, 1)], 0, 10, 10.0),
        ([(0, 1, 1, 1), (5, 3, 1, 1), (10, 3, 3, 3)], 0, 10, 5 + 15.0),
        ([(-5, 2, 1, 1), (5, 4, 1, 1), (10, 4, 1, 1)], 0, 10, 10 + 20.0),  # clipped to the window
    ],
)
def test_replica_seconds_integrate_desired_replicas(
    rows: list[tuple[float, int, int, int]], start: float, end: float, expected: float
) -> None:
    assert replica_seconds(_samples(rows), start, end) == expected


def test_summary_measures_decision_ready_and_serving_from_the_step() -> None:
    phases = Phases(warm_s=5, step_s=20, after_s=20)
    timeline = _samples(
        [
            (-5, 1, 1, 1),
            (0, 1, 1, 1),  # the step
            (3, 3, 1, 1),  # the operator writes 3
            (5, 3, 2, 1),  # one new pod Ready and answering
            (6, 3, 3, 1),  # both
            (8, 3, 3, 2),  # the first new pod answered a routed request
            (9, 3, 3, 3),
            (20, 3, 3, 3),  # load drops
            (30, 2, 2, 2),  # one step down after the window
            (33, 1, 1, 1),
            (40, 1, 1, 1),
        ]
    )
    requests = [
        Request(sent=-1, ok=True, first_token=-0.5, done=0, engine="a"),
        Request(sent=1, ok=True, first_token=2, done=3, engine="a"),
        Request(sent=2, ok=True, first_token=8, done=9, engine="b"),
        Request(sent=4, ok=False),
    ]
    s = summarize(timeline, requests, phases)
    assert (s["decision_s"], s["ready_s"], s["serving_s"]) == (3, 5, 8)
    assert (s["all_ready_s"], s["all_serving_s"]) == (6, 9)
    assert (s["scale_down_s"], s["back_to_min_s"]) == (10, 13)
    assert s["peak_replicas"] == 3 and s["replicas_before"] == 1
    assert s["reversals"] == 1
    assert (s["requests"], s["errors"]) == (4, 1)
    assert s["step_ttft_p50_s"] == pytest.approx(3.5)  # of the two step requests that succeeded: 1 and 6


def test_serving_counts_new_pods_only_when_the_old_one_had_not_answered_by_the_step() -> None:
    # A light warm-up can leave the pre-step pod without an answer at t=0: its first answer after the
    # step is not a new pod serving.
    phases = Phases(warm_s=5, step_s=20, after_s=0)
    timeline = _samples([(0, 1, 1, 0), (1, 1, 1, 1), (3, 3, 1, 1), (5, 3, 2, 1), (8, 3, 2, 2), (20, 3, 2, 2)])
    s = summarize(timeline, [], phases)
    assert (s["decision_s"], s["ready_s"], s["serving_s"]) == (3, 5, 8)


def test_summary_of_a_fleet_that_never_scaled_says_so() -> None:
    phases = Phases(warm_s=5, step_s=10, after_s=5)
    s = summarize(_samples([(-5, 1, 1, 1), (0, 1, 1, 1), (15, 1, 1, 1)]), [], phases)
    assert s["decision_s"] is s["ready_s"] is s["serving_s"] is s["all_ready_s"] is None
    assert s["step_ttft_p50_s"] is None


def test_serving_counts_ready_pods_from_their_first_token_of_a_request_that_succeeded() -> None:
    samples = _samples([(0, 2, 1, 0), (2, 2, 2, 0), (4, 2, 2, 0), (6, 2, 1, 0)])
    ready = [("a",), ("a", "b"), ("a", "b"), ("b",)]  # "a" is gone by t=6
    served = {"a": -3.0, "b": 3.5, "c": 1.0}  # "c" served but was never Ready in a sample
    assert [s.serving for s in with_serving(samples, ready, served)] == [1, 1, 2, 1]


@pytest.mark.parametrize("scale", [1, 5, 15])
def test_our_variant_is_the_crd_defaults_with_shortened_periods(scale: int) -> None:
    defaults = Autoscaling()
    parsed = parse_spec(stack_spec(ours(scale), PodShape(), 1, 8)).autoscaling
    assert parsed.metric == defaults.metric and parsed.effective_target == defaults.effective_target
    assert parsed.interval_seconds == max(1, round(defaults.interval_seconds / scale))
    assert parsed.scale_down.stabilization_seconds == round(defaults.scale_down.stabilization_seconds / scale)
    assert parsed.scale_up == defaults.scale_up.model_copy(
        update={"stabilization_seconds": round(defaults.scale_up.stabilization_seconds / scale)}
    )
    assert parsed.scale_down.max_pods == defaults.scale_down.max_pods


@pytest.mark.parametrize("scale", [1, 5])
def test_hpa_variant_has_the_hpa_defaults_on_a_utilization(scale: int) -> None:
    parsed = parse_spec(stack_spec(hpa_style(scale, 8), PodShape(), 1, 8)).autoscaling
    assert (parsed.metric, parsed.effective_target, parsed.tolerance) == ("kvCacheUsage", 0.8, 0.1)
    assert parsed.interval_seconds * scale == 15
    assert parsed.scale_down.stabilization_seconds * scale == 300
    assert parsed.scale_up.stabilization_seconds == 0
    assert (parsed.scale_up.max_percent, parsed.scale_up.max_pods) == (100, 4)
    assert parsed.scale_down.max_pods == 8  # 100% of the fleet per period


def test_both_variants_use_the_same_scale() -> None:
    a, b = variants(5, 8)
    assert a.autoscaling["intervalSeconds"] == b.autoscaling["intervalSeconds"]
    assert (
        a.autoscaling["scaleDown"]["stabilizationSeconds"]
        == b.autoscaling["scaleDown"]["stabilizationSeconds"]
    )


def test_pod_kv_cache_holds_exactly_max_num_seqs_full_requests() -> None:
    pod = PodShape(max_num_seqs=4, prompt_tokens=480, max_tokens=32)
    assert pod.num_gpu_blocks == 4 * 32
    assert pod.max_model_len == 512
    assert "--num-gpu-blocks 128" in pod.sim_args() and "--max-num-seqs 4" in pod.sim_args()


def test_prompts_have_the_planned_tokens_and_share_no_prefix() -> None:
    rng = random.Random(1)
    a, b = prompt(rng, 480), prompt(rng, 480)
    assert len(encode(a)) == len(encode(b)) == 480
    assert encode(a)[:16] != encode(b)[:16]  # not even the first block


@pytest.mark.parametrize(("rate", "step_rate"), [(0.5, 4.5), (1.0, 2.0)])
def test_arrivals_follow_the_step(rate: float, step_rate: float) -> None:
    phases = Phases(warm_s=100, step_s=200, after_s=100, base_rate=rate, step_rate=step_rate)
    times = arrivals(phases)
    assert times == sorted(times) and times == arrivals(phases)  # deterministic
    assert times[0] >= -100 and times[-1] < 300
    before = sum(1 for t in times if t < 0) / 100
    during = sum(1 for t in times if 0 <= t < 200) / 200
    assert before == pytest.approx(rate, rel=0.3)
    assert during == pytest.approx(step_rate, rel=0.2)
