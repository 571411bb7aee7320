"""Routing policies: pure decisions over EngineState snapshots, table-driven."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence

import pytest

from kvstack.router.engines import Endpoint, EngineState
from kvstack.router.policies import make_policy, policy_names
from kvstack.router.policies.base import Decision, Policy, RequestFeatures
from kvstack.router.policies.least_loaded import LeastLoadedPolicy, engine_score
from kvstack.router.policies.round_robin import RoundRobinPolicy
from kvstack.router.policies.session import HashRing, SessionPolicy, bounded_capacity


def engines(*loads: tuple[int, float | None]) -> list[EngineState]:
    """One engine per (in_flight, num_waiting)."""
    out = []
    for i, (in_flight, waiting) in enumerate(loads):
        st = EngineState(endpoint=Endpoint(url=f"http://e{i}", name=f"e{i}"), models=frozenset({"m"}))
        st.in_flight, st.num_waiting = in_flight, waiting
        out.append(st)
    return out


def req(session: str | None = None) -> RequestFeatures:
    return RequestFeatures(model="m", request_id="r", session_key=session)


@pytest.mark.parametrize(
    ("loads", "expected"),
    [
        ([(0, None), (1, None)], {"e0"}),
        ([(3, None), (1, None), (2, None)], {"e1"}),
        ([(0, 5.0), (2, 0.0)], {"e1"}),  # a queue at the engine outweighs the router's count
        ([(1, 1.0), (2, 0.0), (0, 3.0)], {"e0", "e1"}),  # ties: either, never only the first
        ([(0, None), (0, None), (0, None)], {"e0", "e1", "e2"}),
    ],
)
def test_least_loaded_picks_among_the_least_busy(
    loads: list[tuple[int, float | None]], expected: set[str]
) -> None:
    policy = LeastLoadedPolicy(rng=random.Random(7))
    cands = engines(*loads)
    chosen = {policy.choose(req(), cands, 0.0).engine.name for _ in range(200)}
    assert chosen == expected


def test_least_loaded_spreads_ties_evenly() -> None:
    policy = LeastLoadedPolicy(rng=random.Random(1))
    cands = engines((0, None), (0, None), (0, None), (0, None))
    counts = Counter(policy.choose(req(), cands, 0.0).engine.name for _ in range(4000))
    assert set(counts) == {"e0", "e1", "e2", "e3"}
    assert min(counts.values()) > 800  # uniform would give 1000 each


@pytest.mark.parametrize(("in_flight", "waiting", "score"), [(0, None, 0), (2, None, 2), (2, 3.0, 5)])
def test_engine_score(in_flight: int, waiting: float | None, score: float) -> None:
    assert engine_score(engines((in_flight, waiting))[0]) == score


def test_round_robin_rotates_and_survives_membership_changes() -> None:
    policy = RoundRobinPolicy()
    cands = engines((0, None), (0, None), (0, None))
    picks = [policy.choose(req(), cands, 0.0).engine.name for _ in range(6)]
    assert picks == ["e0", "e1", "e2", "e0", "e1", "e2"]
    fewer = cands[:2]
    assert {policy.choose(req(), fewer, 0.0).engine.name for _ in range(4)} == {"e0", "e1"}


@pytest.mark.parametrize(
    ("total", "n", "factor", "cap"),
    [(0, 2, 1.25, 1), (3, 2, 1.25, 3), (9, 4, 1.25, 4), (99, 4, 1.25, 32), (10, 1, 1.25, 14)],
)
def test_bounded_capacity(total: int, n: int, factor: float, cap: int) -> None:
    assert bounded_capacity(total, n, factor) == cap


def test_session_is_sticky_per_key_and_spreads_keys() -> None:
    policy = SessionPolicy()
    cands = engines((0, None), (0, None), (0, None))
    owners = {}
    for i in range(300):
        key = f"user-{i}"
        first = policy.choose(req(key), cands, 0.0)
        assert first.reason == "session"
        assert all(policy.choose(req(key), cands, 0.0).engine is first.engine for _ in range(3))
        owners[key] = first.engine.name
    counts = Counter(owners.values())
    assert set(counts) == {"e0", "e1", "e2"}
    assert min(counts.values()) > 50


def test_session_moves_only_the_sessions_of_a_removed_engine() -> None:
    policy = SessionPolicy()
    cands = engines((0, None), (0, None), (0, None))
    before = {f"k{i}": policy.choose(req(f"k{i}"), cands, 0.0).engine.name for i in range(300)}
    survivors = [c for c in cands if c.name != "e2"]
    after = {k: policy.choose(req(k), survivors, 0.0).engine.name for k in before}
    for key, owner in before.items():
        if owner != "e2":
            assert after[key] == owner


def test_session_overflows_to_the_next_engine_when_the_owner_is_over_the_bound() -> None:
    policy = SessionPolicy(load_factor=1.25)
    cands = engines((0, None), (0, None))
    owner = policy.choose(req("hot"), cands, 0.0).engine
    owner.in_flight = 10  # total 10 over 2 engines: cap = ceil(1.25 * 11 / 2) = 7
    decision = policy.choose(req("hot"), cands, 0.0)
    assert decision.engine is not owner
    assert decision.reason == "session_overflow"
    owner.in_flight = 6
    other = next(c for c in cands if c is not owner)
    other.in_flight = 4  # cap = ceil(1.25 * 11 / 2) = 7 > 6: stays home
    assert policy.choose(req("hot"), cands, 0.0).engine is owner


def test_session_without_a_key_is_least_loaded() -> None:
    policy = SessionPolicy(rng=random.Random(3))
    cands = engines((5, None), (1, None), (3, None))
    decision = policy.choose(req(None), cands, 0.0)
    assert (decision.engine.name, decision.reason) == ("e1", "least_loaded")


def test_hash_ring_walk_lists_each_url_once() -> None:
    ring = HashRing(["a", "b", "c"], vnodes=50)
    walk = ring.walk("some-key")
    assert sorted(walk) == ["a", "b", "c"]


@pytest.mark.parametrize("name", ["round_robin", "least_loaded", "session"])
def test_make_policy_builds_each_builtin(name: str) -> None:
    policy = make_policy(name)
    assert policy.name == name
    assert policy.needs_tokens is False
    assert name in policy_names()


def test_make_policy_rejects_unknown_names_listing_the_known_ones() -> None:
    with pytest.raises(ValueError, match="least_loaded"):
        make_policy("fastest")


def test_a_policy_that_defines_only_choose_has_every_hook_and_the_lifecycle() -> None:
    class First(Policy):
        name = "first"

        def choose(self, request: RequestFeatures, candidates: Sequence[EngineState], now: float) -> Decision:
            return Decision(engine=candidates[0], reason="first")

    policy, request = First(), req()
    decision = policy.choose(request, engines((0, None)), 0.0)
    policy.on_dispatch(request, decision)
    policy.on_first_token(request, decision)
    policy.on_finish(request, decision, True)
    asyncio.run(policy.start())
    asyncio.run(policy.stop())
    assert (policy.needs_tokens, policy.needs_text) == (False, False)
    with pytest.raises(TypeError, match="choose"):
        Policy()  # type: ignore[abstract]


@pytest.mark.parametrize("name", policy_names())
def test_every_policy_is_built_on_the_base(name: str) -> None:
    assert isinstance(make_policy(name), Policy)
