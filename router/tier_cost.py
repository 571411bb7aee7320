"""Tier costs learned online from the engines' times to first token (pure; the policy feeds it).

What a token loaded from LMCache costs changes with the deployment and with load: the H200 fit
says 4.0 us/token from the CPU tier and 330 us per token asked from Redis (43% of them lost and
recomputed), but Redis round trips slow down as engines queue on it, and LMCache's synchronous
stores stall every step that writes. Fixed weights cannot follow that, so the router learns them.

The model: the cost model predicts a request's TTFT with a per-token cost ``c[t]`` for each tier
``t`` it expects to serve from (a GPU hit ~0, a CPU-tier load ``c[cpu]``, a Redis load
``c[shared]``; computing costs ``1 / prefill_rate``). At the first token the observed TTFT minus
the prediction is the request's *residual*. Part of it is the queue model's own error, shared by
every request; the rest comes from the tier costs being wrong. So:

* only requests with little prefill queued ahead of them teach anything (``max_queued_tokens``):
  behind a queue the queue model's error dwarfs a tier's load time;
* requests served (as predicted) from the GPU alone feed ``baseline``, an EWMA of the residual;
* a request with at least ``min_tokens`` predicted from tier ``t`` (the one with the most tokens,
  if several) gives a sample ``c[t] + (residual - baseline) / tokens[t]``, clipped to
  ``[0, max_cost]``, folded into ``c[t]`` as an EWMA;
* a tier's weight, the fraction of a GPU hit one of its tokens is worth, is ``1 - c[t] * rate``
  floored at 0 (:func:`weights`): the same rule as ``kvindex.tier_weights.tier_weight``, with the
  measured cost in place of the fitted one.

Every outcome of :func:`observe` is a typed reason, so the policy's metrics and tests can tell a
learning step from a skipped sample.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from kvstack.router.residency import TierTokens, TierWeights


class TierLearning(BaseModel):
    """Settings of the online tier-cost learner (``cache_aware.decision.tier_learning``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    # Where learning starts, in units of computing one token (1 / prefill rate): the H200 fit
    # (bench-results/lmcache/README.md) of LMCache's CPU tier (4.0 us/token against ~68 us to compute
    # on that shared GPU) and Redis (330 us per token asked, and 43% of them lost and recomputed).
    cpu_prior: float = Field(round(4.0 / 68.0, 3), ge=0.0)
    shared_prior: float = Field(round(330.0 / 68.0 + 0.43, 2), ge=0.0)
    alpha: float = Field(0.1, gt=0.0, le=1.0)  # EWMA weight of one sample
    min_tokens: int = Field(256, ge=1)  # a tier's sample needs this many of its tokens predicted
    # a sample's cost per token is clipped to this: one stalled request must not zero a tier
    max_cost_us_per_token: float = Field(1000.0, gt=0.0)
    max_residual_s: float = Field(30.0, gt=0.0)  # residuals beyond this are dropped as outliers
    # Learn only from requests that had at most this much prefill queued ahead on their engine: a
    # queue's error dwarfs a tier's load time, and requests served from a tier are the ones sent
    # to busy engines. Without it a run at KV pressure learnt the CPU tier at 405 us/token (4 us).
    max_queued_tokens: float = Field(2048.0, ge=0.0)


@dataclass(frozen=True, slots=True)
class TierCosts:
    """Learnt seconds per token by tier, and the queue model's residual baseline (seconds)."""

    cpu_s: float
    shared_s: float
    baseline_s: float = 0.0
    samples_cpu: int = 0
    samples_shared: int = 0
    samples_baseline: int = 0

    @classmethod
    def from_weights(cls, w: TierWeights, rate: float) -> TierCosts:
        """The costs the configured weights stand for, at ``rate`` tokens/s of cold prefill."""
        return cls(cpu_s=(1.0 - w.cpu) / rate, shared_s=(1.0 - w.shared) / rate)


class Outcome(Enum):
    BASELINE = "baseline"  # a GPU-only request: the queue model's residual moved
    CPU = "cpu"  # the CPU tier's cost moved
    SHARED = "shared"  # the shared store's cost moved
    TOO_FEW_TOKENS = "too_few_tokens"  # no tier had min_tokens predicted, and it was not GPU-only
    OUTLIER = "outlier"  # |residual| > max_residual_s
    QUEUED = "queued"  # more than max_queued_tokens were queued ahead: the queue's error dominates
    DISABLED = "disabled"


def observe(
    costs: TierCosts,
    tiers: TierTokens,
    predicted_s: float,
    observed_s: float,
    s: TierLearning,
    queued_tokens: float = 0.0,
) -> tuple[TierCosts, Outcome]:
    """Fold one request's observed TTFT into the costs. ``tiers``: what it was predicted to be
    served from on its engine; ``predicted_s``: the TTFT the cost model predicted with ``costs``;
    ``queued_tokens``: the prefill queued ahead of it there when it was sent."""
    if not s.enabled:
        return costs, Outcome.DISABLED
    if queued_tokens > s.max_queued_tokens:
        return costs, Outcome.QUEUED
    residual = observed_s - predicted_s
    if abs(residual) > s.max_residual_s:
        return costs, Outcome.OUTLIER
    a = s.alpha
    if tiers.cpu < s.min_tokens and tiers.shared < s.min_tokens:
        if tiers.cpu > 0 or tiers.shared > 0:
            return costs, Outcome.TOO_FEW_TOKENS
        baseline = costs.baseline_s + a * (residual - costs.baseline_s)
        learnt = replace(costs, baseline_s=baseline, samples_baseline=costs.samples_baseline + 1)
        return learnt, Outcome.BASELINE
    limit = s.max_cost_us_per_token * 1e-6
    excess = residual - costs.baseline_s
    if tiers.shared >= tiers.cpu:
        sample = min(limit, max(0.0, costs.shared_s + excess / tiers.shared))
        shared_s = costs.shared_s + a * (sample - costs.shared_s)
        return replace(costs, shared_s=shared_s, samples_shared=costs.samples_shared + 1), Outcome.SHARED
    sample = min(limit, max(0.0, costs.cpu_s + excess / tiers.cpu))
    cpu_s = costs.cpu_s + a * (sample - costs.cpu_s)
    return replace(costs, cpu_s=cpu_s, samples_cpu=costs.samples_cpu + 1), Outcome.CPU


def weights(costs: TierCosts, rate: float, gpu: float = 1.0) -> TierWeights:
    """The tier weights the learnt costs stand for at ``rate`` tokens/s of cold prefill."""
    return TierWeights(
        gpu=gpu, cpu=max(0.0, 1.0 - costs.cpu_s * rate), shared=max(0.0, 1.0 - costs.shared_s * rate)
    )
