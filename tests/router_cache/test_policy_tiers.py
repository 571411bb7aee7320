"""cache_aware with LMCache tiers: a GPU hit the queue ahead will evict, and tier costs learnt online."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from kvstack.common.kv_events import BlockRemoved, BlockStored
from kvstack.router.engines import EngineState
from kvstack.router.kvindex.index import IndexSettings, KVIndex
from kvstack.router.policies.cache_aware import CacheAwarePolicy
from kvstack.router.policies.cache_aware_settings import CacheAwareSettings
from kvstack.router.policies.cache_aware_tiers import FreeOrder
from kvstack.router.tier_cost import TierLearning

from .test_policy import BS, MODEL, SYSTEM, chat, engines, policy, req, route

PROMPT = chat(SYSTEM * 4, "Summarize the document above.")  # ~1,200 tokens


def stored(tokens: list[int], medium: str, base: int) -> BlockStored:
    n = len(tokens) // BS
    return BlockStored(
        block_hashes=[base + i for i in range(n)],
        parent_block_hash=None,
        token_ids=tokens[: n * BS],
        block_size=BS,
        medium=medium,
    )


def busy(cands: list[EngineState], *, holder_usage: float, others_usage: float = 0.5) -> None:
    """Every engine scraped with 2 waiting requests (equal load); the holder e0 at ``holder_usage``."""
    for st in cands:
        st.num_waiting, st.num_running, st.last_scrape = 2.0, 4.0, 1.0
        st.kv_cache_usage = others_usage
    cands[0].kv_cache_usage = holder_usage


@pytest.mark.parametrize(
    ("residency", "holder_usage", "copies", "chosen", "reason"),
    [
        # e0's free KV (1,600 tokens) is less than the 2,048 queued ahead: its prefix will be evicted
        # and, stored nowhere else, recomputed there: e0 has no edge, a cold placement among equals
        (True, 0.99, "none", None, "cold"),
        # ... the router that trusts the index sends it to e0, to wait behind the queue for nothing
        (False, 0.99, "none", "http://e0", "cache_hit"),
        # ... e0's LMCache CPU tier holds the prefix: reloading it from there is cheap, stay
        (True, 0.99, "cpu", "http://e0", "cache_hit"),
        # ... only Redis holds it (e0's CPU tier evicted it): every engine would load it from there,
        # slower than computing, so no engine holds a hit worth having
        (True, 0.99, "redis", None, "cold"),
        # e0 has room (80,000 free tokens): the prefix survives the queue
        (True, 0.5, "none", "http://e0", "cache_hit"),
    ],
)
def test_a_gpu_hit_the_queue_will_evict(
    residency: bool, holder_usage: float, copies: str, chosen: str | None, reason: str
) -> None:
    p = policy(explore_rate=0.0, residency=residency)
    cands = engines(4)
    busy(cands, holder_usage=holder_usage)
    p.index.apply("http://e0", [stored(PROMPT, "GPU", 1)])
    if copies != "none":
        chunk = stored(PROMPT, "cpu", 10_000)
        p.index.apply("http://e0", [chunk])
        if copies == "redis":  # evicted from e0's CPU tier; the shared store keeps its copy
            p.index.apply("http://e0", [BlockRemoved(block_hashes=chunk.block_hashes, medium="cpu")])
    url = route(p, cands, req(PROMPT + chat("", "again")[1:]), now=2.0)
    assert p.stats.reasons is not None and p.stats.reasons[reason] == 1
    if chosen is not None:
        assert url == chosen
    assert p.stats.residency_discounted == (1 if residency and holder_usage > 0.9 else 0)


def test_when_every_engine_is_kv_bound_the_holder_keeps_its_hit() -> None:
    """Nowhere has room for the request: it waits for blocks wherever it goes, so the discount
    would only scatter sessions; the holder's prefix is still the best bet."""
    p = policy(explore_rate=0.0, residency=True)
    cands = engines(4)
    busy(cands, holder_usage=0.99, others_usage=0.99)
    p.index.apply("http://e0", [stored(PROMPT, "GPU", 1)])
    url = route(p, cands, req(PROMPT + chat("", "again")[1:]), now=2.0)
    assert url == "http://e0"
    assert p.stats.reasons is not None and p.stats.reasons["cache_hit"] == 1
    assert p.stats.residency_discounted == 0


def first_token(p: CacheAwarePolicy, cands: list[EngineState], tokens: list[int], after_s: float) -> str:
    r = req(tokens)
    p.test_clock[0] = 0.0  # type: ignore[attr-defined]
    d = p.choose(r, cands, 0.0)
    p.on_dispatch(r, d)
    p.test_clock[0] = after_s  # type: ignore[attr-defined]
    p.on_first_token(r, d)
    p.on_finish(r, d, True)
    return d.engine.url


def test_the_cpu_tier_cost_is_learnt_from_slow_first_tokens() -> None:
    p = policy(explore_rate=0.0, tier_learning=TierLearning(alpha=0.5, min_tokens=64))
    cands = engines(4)
    p.index.apply("http://e1", [stored(PROMPT, "cpu", 1)])  # e1 holds it only in its CPU tier
    before = p.tiers.costs
    w0 = p.tiers.weights().cpu
    assert first_token(p, cands, PROMPT, after_s=2.0) == "http://e1"
    learnt = p.tiers.costs
    assert p.tiers.outcomes["cpu"] == 1
    assert learnt.cpu_s > before.cpu_s and learnt.shared_s == before.shared_s
    assert p.tiers.weights().cpu < w0  # a CPU-tier hit is now worth less than a GPU hit


def test_gpu_only_requests_learn_the_baseline_not_a_tier() -> None:
    p = policy(explore_rate=0.0)
    cands = engines(4)
    p.index.apply("http://e2", [stored(PROMPT, "GPU", 1)])
    before = p.tiers.costs
    assert first_token(p, cands, PROMPT, after_s=0.5) == "http://e2"
    after = p.tiers.costs
    assert p.tiers.outcomes["baseline"] == 1
    assert after.baseline_s > 0.0
    assert dataclasses.replace(after, baseline_s=0.0, samples_baseline=0) == before


def test_learning_off_keeps_the_configured_weights() -> None:
    p = policy(explore_rate=0.0, tier_learning=TierLearning(enabled=False))
    w = p.tiers.weights()
    assert (w.cpu, w.shared) == pytest.approx((p.index.settings.cpu_weight, p.index.settings.shared_weight))
    cands = engines(4)
    p.index.apply("http://e1", [stored(PROMPT, "cpu", 1)])
    first_token(p, cands, PROMPT, after_s=5.0)
    assert p.tiers.outcomes["disabled"] == 1
    assert p.tiers.weights() == w


def test_the_decision_log_shows_residency_and_the_learnt_costs(caplog: pytest.LogCaptureFixture) -> None:
    """The benchmark's per-request trace reads these fields (kvstack.bench.trace)."""
    p = policy(explore_rate=0.0, residency=True)
    cands = engines(4)
    busy(cands, holder_usage=0.99)
    p.index.apply("http://e0", [stored(PROMPT, "GPU", 1)])
    with caplog.at_level(logging.DEBUG, logger="kvstack.router.decision"):
        route(p, cands, req(PROMPT), now=2.0)
    (record,) = [r for r in caplog.records if r.name == "kvstack.router.decision"]
    engines_ = {e["engine"]: e for e in record.engines}  # type: ignore[attr-defined]
    assert engines_["e0"]["gpu_tokens"] == len(PROMPT) // BS * BS  # what the index holds now ...
    assert engines_["e0"]["resident"] == 0.0  # ... and what will be left of it when the request runs
    assert engines_["e1"]["resident"] == 1.0
    assert engines_["e0"]["hit_tokens"] == 0.0  # stored nowhere else: recomputed
    assert record.tier_cost_us == {  # type: ignore[attr-defined]
        "cpu": pytest.approx(p.tiers.costs.cpu_s * 1e6, abs=0.01),
        "shared": pytest.approx(p.tiers.costs.shared_s * 1e6, abs=0.01),
    }


@pytest.mark.parametrize(("holder_usage", "expected"), [(0.5, 1.0), (0.99, 0.0)])
def test_expected_hit_weighs_as_choose_does(holder_usage: float, expected: float) -> None:
    """Flow control's admission cost and placement read this: the hit that will still be there."""
    p = policy(explore_rate=0.0, residency=True)
    cands = engines(4)
    busy(cands, holder_usage=holder_usage)
    p.index.apply("http://e0", [stored(PROMPT, "GPU", 1)])
    full = len(PROMPT) // BS * BS
    # at usage 0.5, 80,000 free tokens against 2,048 queued: ~97% of the prefix stays
    assert p.expected_hit(req(PROMPT), cands, 2.0).tokens == pytest.approx(expected * full, rel=0.03)
    assert p.stats.decisions == 0


def test_free_order_places_a_prefix_by_what_was_freed_after_it() -> None:
    order = FreeOrder(max_entries=3)
    a, b = (1, 2, 3), (1, 2, 9)
    order.dispatched("r1", "e0", a, 100.0)
    assert order.place("e0", a, 3) == -1.0  # its request runs: referenced, it stays
    order.finished("r1")
    assert order.place("e0", a, 3) == 0.0  # just freed: nothing behind it
    order.dispatched("r2", "e0", b, 250.0)
    order.finished("r2")
    assert order.place("e0", a, 3) == 250.0  # r2's blocks were freed after it
    assert order.place("e0", (*a, 4, 5), 5) == 250.0  # a longer prompt finds its deepest mark
    assert order.place("e0", (7, 8), 2) is None  # never ours: the uniform model applies
    assert order.place("e1", a, 3) is None  # per engine
    for i in range(5):  # bounded
        order.dispatched(f"x{i}", "e0", (100 + i,), 1.0)
        order.finished(f"x{i}")
    assert len(order.marks) <= 3 and len(order.running) == 0 and not order.in_use


@pytest.mark.parametrize(("ours", "resident"), [(True, 1.0), (False, 0.104)])
def test_a_session_freed_just_now_keeps_its_hit(ours: bool, resident: float) -> None:
    """e0 has 16,000 free KV tokens and 14,336 queued ahead. Placed uniformly in the free queue
    its prefix would survive 10%; its previous turn, sent by us, ended a moment ago, so the older
    14,384 free tokens go first and it survives whole (``ours``). Not ours: the uniform model."""
    p = policy(explore_rate=0.0, residency=True)
    cands = engines(4)
    busy(cands, holder_usage=0.9)
    for st in cands:
        st.num_waiting = 14.0  # 14 x 1,024 tokens queued everywhere: equal load
    p.index.apply("http://e0", [stored(PROMPT, "GPU", 1)])
    if ours:
        first = req(PROMPT)
        d = p.choose(first, [cands[0]], 0.0)
        p.on_dispatch(first, d)
        p.on_first_token(first, d)
        p.on_finish(first, d, True)
    p.test_clock[0] = 2.0  # type: ignore[attr-defined]
    d = p.choose(req(PROMPT + chat("", "again")[1:]), cands, 2.0)
    assert d.engine.url == "http://e0"  # equal queues everywhere: even a tenth of a hit wins
    assert d.predicted_hit_tokens == pytest.approx(resident * (len(PROMPT) // BS * BS), abs=BS)


@pytest.mark.parametrize("from_gpu", [False, True])
def test_another_engine_is_priced_a_redis_load_for_what_the_holder_prefilled(from_gpu: bool) -> None:
    """LMCache writes what an engine prefills through to Redis; engines that send no events for it
    leave the index blind unless ``shared_store_from_gpu`` says so. Then every other engine's hit
    on that prefix is a load from Redis: worth no compute (weight 0) and slower than computing."""
    index = KVIndex(IndexSettings(shared_store_from_gpu=from_gpu))
    cands = engines(4)
    for st in cands:
        index.ensure_engine(st.url, model=MODEL, block_size=BS)
    p = CacheAwarePolicy(index, CacheAwareSettings(explore_rate=0.0), clock=lambda: 0.0)
    p.index.apply("http://e0", [stored(PROMPT, "GPU", 1)])
    r = req(PROMPT + chat("", "again")[1:])
    held = len(PROMPT) // BS * BS
    assert p.expected_hit(r, [cands[0]], 0.0) == (held, 0.0)
    elsewhere = p.expected_hit(r, [cands[1]], 0.0)
    assert elsewhere.tokens == 0.0
    prior = TierLearning().shared_prior  # Redis's cost per token, in units of computing one
    expected = held * (prior - 1) / CacheAwareSettings().prefill_tokens_per_s if from_gpu else 0.0
    assert elsewhere.load_s == pytest.approx(expected)
