"""The cost model prices prefill at each engine's learnt rate (flow control's), else the prior."""

from __future__ import annotations

import random

import pytest

from kvstack.router.app import build_context
from kvstack.router.config import RouterSettings
from kvstack.router.engines import Endpoint, EngineState
from kvstack.router.kvindex.index import KVIndex
from kvstack.router.policies.base import Decision, RequestFeatures
from kvstack.router.policies.cache_aware import CacheAwarePolicy
from kvstack.router.policies.cache_aware_decide import CandidateView, decide, est_ttft, rate_of
from kvstack.router.policies.cache_aware_settings import CacheAwareSettings

S = CacheAwareSettings(explore_rate=0.0)


@pytest.mark.parametrize(
    ("learnt", "expected"),
    [
        (0.0, S.prefill_tokens_per_s),  # nothing learnt: the configured prior
        (6_000.0, 6_000.0),  # learnt: the engine's own
        (80_000.0, 80_000.0),  # faster than the prior too
    ],
)
def test_rate_of(learnt: float, expected: float) -> None:
    assert rate_of(CandidateView(0.0, 0.0, 0.0, 0.0, prefill_rate=learnt), S) == expected


@pytest.mark.parametrize("rate", [34_000.0, 17_000.0, 6_000.0])
def test_queue_priced_at_the_learnt_rate(rate: float) -> None:
    queued = 12_000.0
    view = CandidateView(hit_tokens=1024.0, queued_tokens=queued, running=0.0, load=1.0, prefill_rate=rate)
    # no decode interference (nothing running): base + (queue + own uncached) / rate
    assert est_ttft(1024, view, S) == pytest.approx(S.base_ttft_s + queued / rate)


def _holder_and_idle_neighbour(rate: float, speeds: tuple[float, ...] | None = None) -> list[CandidateView]:
    """A decision from the H100 run with two LMCache engines on one GPU (bench-results/lmcache
    section 17, `pl1-dev` run 1 at 4.5 s): the engine holding the shared system prompt (2,192
    tokens) has ~22K tokens of prefill queued and five requests decoding; its neighbour is idle and
    would load the prefix from LMCache's Redis tier, learnt to cost 0.28 s more than computing it.
    ``speeds``: the device's learnt slowdown (None: the configured prior)."""
    idle = CandidateView(
        hit_tokens=0.0,
        queued_tokens=0.0,
        running=0.0,
        load=0.0,
        device_busy=1,
        device_queued=21_910.0,
        bound_load=9.0,
        load_s=0.276,
        prefill_rate=rate,
        speeds=speeds,
    )
    holder = CandidateView(
        hit_tokens=2_192.0,
        queued_tokens=21_910.0,
        running=5.0,
        load=9.0,
        bound_load=9.0,
        prefill_rate=rate,
    )
    return [idle, holder]


@pytest.mark.parametrize(
    ("rate", "expected", "reason"),
    [
        # at the H200 prior the queue looks like 0.64 s: the holder takes the request (it then
        # waited 8.9 s there)
        (0.0, 1, "cache_hit"),
        # at the ~6K tokens/s such an engine prefills, the queue is 3.7 s: the idle engine
        (6_000.0, 0, "load"),
    ],
)
def test_learnt_rate_moves_a_request_off_a_long_queue(rate: float, expected: int, reason: str) -> None:
    choice = decide(6_740, _holder_and_idle_neighbour(rate), S, random.Random(0))
    assert (choice.index, choice.reason) == (expected, reason)


def test_learnt_speeds_move_the_decision_off_the_busy_holder() -> None:
    """The same decision at the rate and speed these engines showed (flow/device_speed.py): priced
    with the 0.65 prior the holder takes it; with the learnt 0.95 the idle neighbour does."""
    assert decide(6_740, _holder_and_idle_neighbour(20_000.0), S, random.Random(0)).index == 1
    assert decide(6_740, _holder_and_idle_neighbour(20_000.0, (0.95,)), S, random.Random(0)).index == 0


def _engine(url: str) -> EngineState:
    return EngineState(Endpoint(url=url, name=url, models=frozenset({"m"})))


def test_the_ledger_holds_a_prefill_as_long_as_the_learnt_rate_says() -> None:
    """Priced at the prior, a dispatched prefill left the router's ledger after a fraction of the
    time a slow engine took, so its queue looked empty while it was not."""
    now = [100.0]
    policy = CacheAwarePolicy(KVIndex(), S, clock=lambda: now[0])
    engine = _engine("http://e0")
    policy.use_prefill_rates(lambda st: 2_000.0, lambda device, prior: prior)
    request = RequestFeatures(request_id="r1", model="m", prompt_token_ids=tuple(range(8_000)))
    decision = policy.choose(request, [engine], now[0])
    policy.on_dispatch(request, Decision(engine=engine, reason=decision.reason))
    prior_s = S.prefill_deadline_factor * 8_000 / S.prefill_tokens_per_s + S.prefill_deadline_floor_s
    now[0] += prior_s + 0.5  # past the hold the prior would give: at 2,000 tokens/s it is 4 s
    assert policy.ledger.queued(engine.url, now[0], scraped_at=None, num_waiting=None) == pytest.approx(
        8_000.0
    )
    now[0] += S.prefill_deadline_factor * 4.0 + S.prefill_deadline_floor_s  # past the learnt hold
    assert policy.ledger.queued(engine.url, now[0], scraped_at=None, num_waiting=None) == 0.0


@pytest.mark.parametrize("enabled", [True, False])
def test_the_router_wires_flow_controls_rates_into_the_policy(enabled: bool) -> None:
    settings = RouterSettings(
        engines=["http://127.0.0.1:9"], policy="cache_aware", flow_control={"enabled": enabled}
    )
    ctx = build_context(settings)
    assert isinstance(ctx.policy, CacheAwarePolicy)
    if enabled:
        engine = _engine("http://e0")
        assert ctx.policy.rates is not None
        # learnt device speeds (on by default): a device's engines priced at its rate alone
        assert ctx.policy.rates(engine) == ctx.flow.room.pricing_rate(engine)
        assert ctx.policy.speeds is not None
        assert ctx.policy.speeds("gpu-0", (0.65,)) == ctx.flow.room.device_speeds("gpu-0", (0.65,))
    else:
        assert ctx.policy.rates is None


def test_the_configured_device_speeds_when_told_not_to_learn_them() -> None:
    decision = {"learn_device_speed": False}
    settings = RouterSettings(
        engines=["http://127.0.0.1:9"], policy="cache_aware", cache_aware={"decision": decision}
    )
    ctx = build_context(settings)
    assert isinstance(ctx.policy, CacheAwarePolicy)
    engine = _engine("http://e0")
    assert ctx.policy.speeds is None and ctx.policy.rates is not None
    assert ctx.policy.rates(engine) == ctx.flow.room.rate(engine)
