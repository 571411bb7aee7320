"""Online tier-cost learning from observed TTFTs (pure; tables)."""

from __future__ import annotations

import pytest

from kvstack.router.residency import TierTokens, TierWeights
from kvstack.router.tier_cost import Outcome, TierCosts, TierLearning, observe, weights

RATE = 10_000.0  # tokens/s of cold prefill: computing a token costs 100 us
S = TierLearning(alpha=0.5, min_tokens=100, max_cost_us_per_token=1000.0, max_residual_s=30.0)
C0 = TierCosts(cpu_s=10e-6, shared_s=200e-6, baseline_s=0.0)


@pytest.mark.parametrize(
    ("costs", "tiers", "predicted", "observed", "outcome", "cpu_us", "shared_us", "baseline_s"),
    [
        # a GPU-only request moves the queue model's baseline, not a tier: halfway to +0.2 s
        (C0, TierTokens(gpu=1000), 1.0, 1.2, Outcome.BASELINE, 10, 200, 0.1),
        # a CPU-tier load 1,000 tokens long took 0.1 s more than predicted: 100 us more per token,
        # half of it learnt at alpha 0.5
        (C0, TierTokens(gpu=500, cpu=1000), 1.0, 1.1, Outcome.CPU, 60, 200, 0.0),
        # ... less the baseline's share: with a 0.1 s baseline the tier explains nothing more
        (
            TierCosts(cpu_s=10e-6, shared_s=200e-6, baseline_s=0.1),
            TierTokens(cpu=1000),
            1.0,
            1.1,
            Outcome.CPU,
            10,
            200,
            0.1,
        ),
        # faster than predicted: the cost falls, never below 0
        (C0, TierTokens(cpu=1000), 1.0, 0.5, Outcome.CPU, 5, 200, 0.0),
        # a Redis load 2,000 tokens long, 1 s slower: a sample of 700 us/token, learnt halfway
        (C0, TierTokens(cpu=100, shared=2000), 1.0, 2.0, Outcome.SHARED, 10, 450, 0.0),
        # a stall far beyond the clip: the sample is the clip (1,000 us), not the stall
        (C0, TierTokens(shared=200), 1.0, 21.0, Outcome.SHARED, 10, 600, 0.0),
        # the tier with more tokens takes the sample
        (C0, TierTokens(cpu=3000, shared=2000), 1.0, 1.0, Outcome.CPU, 10, 200, 0.0),
        # too few tokens from a tier to say anything, and not GPU-only either: nothing moves
        (C0, TierTokens(gpu=4000, cpu=50), 1.0, 3.0, Outcome.TOO_FEW_TOKENS, 10, 200, 0.0),
        # a residual beyond max_residual_s (a client that stopped reading): dropped
        (C0, TierTokens(cpu=1000), 1.0, 40.0, Outcome.OUTLIER, 10, 200, 0.0),
    ],
)
def test_observe(
    costs: TierCosts,
    tiers: TierTokens,
    predicted: float,
    observed: float,
    outcome: Outcome,
    cpu_us: float,
    shared_us: float,
    baseline_s: float,
) -> None:
    learnt, got = observe(costs, tiers, predicted, observed, S)
    assert got is outcome
    assert learnt.cpu_s * 1e6 == pytest.approx(cpu_us)
    assert learnt.shared_s * 1e6 == pytest.approx(shared_us)
    assert learnt.baseline_s == pytest.approx(baseline_s)


@pytest.mark.parametrize(
    ("queued", "outcome", "cpu_us"),
    [
        (0.0, Outcome.CPU, 60),  # nothing ahead: the residual is the tier's (as in test_observe)
        (2048.0, Outcome.CPU, 60),  # at the bound: still learnt
        (2049.0, Outcome.QUEUED, 10),  # behind a queue: the queue's error would be learnt as the tier's
    ],
)
def test_only_requests_with_little_queued_ahead_teach(queued: float, outcome: Outcome, cpu_us: float) -> None:
    s = S.model_copy(update={"max_queued_tokens": 2048.0})
    learnt, got = observe(C0, TierTokens(gpu=500, cpu=1000), 1.0, 1.1, s, queued)
    assert got is outcome
    assert learnt.cpu_s * 1e6 == pytest.approx(cpu_us)


def test_disabled_learns_nothing() -> None:
    off = TierLearning(enabled=False)
    assert observe(C0, TierTokens(cpu=1000), 1.0, 5.0, off) == (C0, Outcome.DISABLED)


def test_repeated_samples_converge_on_the_true_cost() -> None:
    """A Redis tier that really costs 500 us/token: the learnt cost gets there from the prior."""
    costs, true_s = C0, 500e-6
    for _ in range(40):
        tiers = TierTokens(shared=1000)
        predicted = 1.0 + tiers.shared * costs.shared_s
        observed = 1.0 + tiers.shared * true_s
        costs, _ = observe(costs, tiers, predicted, observed, S)
    assert costs.shared_s == pytest.approx(true_s, rel=1e-3)
    assert costs.samples_shared == 40


@pytest.mark.parametrize(
    ("costs", "expected"),
    [
        (TierCosts(cpu_s=0.0, shared_s=0.0), TierWeights(1.0, 1.0, 1.0)),  # free loads: as good as GPU
        (TierCosts(cpu_s=6e-6, shared_s=50e-6), TierWeights(1.0, 0.94, 0.5)),
        # as slow as computing, or slower: worth nothing
        (TierCosts(cpu_s=100e-6, shared_s=500e-6), TierWeights(1.0, 0.0, 0.0)),
    ],
)
def test_weights(costs: TierCosts, expected: TierWeights) -> None:
    got = weights(costs, RATE)
    assert (got.gpu, got.cpu, got.shared) == pytest.approx((expected.gpu, expected.cpu, expected.shared))


def test_from_weights_round_trips() -> None:
    w = TierWeights(1.0, 0.94, 0.25)
    got = weights(TierCosts.from_weights(w, RATE), RATE)
    assert (got.cpu, got.shared) == pytest.approx((0.94, 0.25))
