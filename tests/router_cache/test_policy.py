"""The cache_aware policy over a real index: decisions, dispatch feedback, replica agreement."""

from __future__ import annotations

import itertools
import random

from kvstack.common.kv_events import BlockStored, KVEvent
from kvstack.common.tokenizer import apply_chat_template
from kvstack.router.engines import Endpoint, EngineState
from kvstack.router.kvindex.index import KVIndex
from kvstack.router.policies.base import RequestFeatures
from kvstack.router.policies.cache_aware import CacheAwarePolicy
from kvstack.router.policies.cache_aware_settings import CacheAwareSettings

MODEL, BS = "m", 16
_h = itertools.count(1)
_r = itertools.count(1)


def engines(n: int, *, events: bool = True) -> list[EngineState]:
    out = []
    for i in range(n):
        ep = Endpoint(
            url=f"http://e{i}",
            name=f"e{i}",
            models=frozenset({MODEL}),
            kv_events_endpoint=f"tcp://127.0.0.1:{5600 + i}" if events else None,
        )
        out.append(EngineState(endpoint=ep, models=ep.models, block_size=BS, num_gpu_blocks=10_000))
    return out


def chat(system: str, user: str) -> list[int]:
    return apply_chat_template([("system", system), ("user", user)])


SYSTEM = "You are a careful assistant. " * 40


def req(tokens: list[int], session: str | None = None) -> RequestFeatures:
    return RequestFeatures(
        model=MODEL, request_id=f"r{next(_r)}", prompt_token_ids=tokens, session_key=session
    )


def stored(tokens: list[int]) -> BlockStored:
    n = len(tokens) // BS
    return BlockStored(
        block_hashes=[next(_h) for _ in range(n)],
        parent_block_hash=None,
        token_ids=tokens[: n * BS],
        block_size=BS,
    )


def policy(seed: int = 0, **kw: object) -> CacheAwarePolicy:
    index = KVIndex()
    for e in engines(4):
        index.ensure_engine(e.url, model=MODEL, block_size=BS)
    clock = [0.0]
    p = CacheAwarePolicy(index, CacheAwareSettings(seed=seed, **kw), clock=lambda: clock[0])  # type: ignore[arg-type]
    p.test_clock = clock  # type: ignore[attr-defined]
    return p


def route(p: CacheAwarePolicy, cands: list[EngineState], r: RequestFeatures, now: float = 0.0) -> str:
    p.test_clock[0] = now  # type: ignore[attr-defined]
    d = p.choose(r, cands, now)
    p.on_dispatch(r, d)
    return d.engine.url


def test_the_engine_holding_the_prefix_wins_and_reports_its_hit() -> None:
    p, cands = policy(explore_rate=0.0), engines(4)
    prompt = chat(SYSTEM, "What is a KV cache?")
    p.index.apply("http://e2", [stored(prompt)])
    d = p.choose(req(prompt + chat("", "again")[1:]), cands, 0.0)
    assert (d.engine.url, d.reason) == ("http://e2", "cache_hit")
    assert d.predicted_hit_tokens == len(prompt) // BS * BS


def test_siblings_follow_the_first_request_before_any_event() -> None:
    p, cands = policy(explore_rate=0.0), engines(4)
    first = route(p, cands, req(chat(SYSTEM, "q1")))
    assert p.stats.reasons is not None and p.stats.reasons["cold"] == 1
    assert {route(p, cands, req(chat(SYSTEM, f"q{i}"))) for i in range(2, 6)} == {first}


def test_cold_prompts_spread_over_engines() -> None:
    p, cands = policy(explore_rate=0.0), engines(4)
    urls = [route(p, cands, req(chat(f"system {i} " * 30, "hi"))) for i in range(4)]
    assert sorted(urls) == [e.url for e in cands]


def test_queued_prefill_moves_work_off_a_busy_holder_until_it_finishes() -> None:
    p, cands = policy(explore_rate=0.0), engines(2)
    shared = chat(SYSTEM, "shared")
    p.index.apply("http://e0", [stored(shared)])
    big = req([7000 + j % 20_000 for j in range(60_000)])
    route(p, cands[:1], big)  # 60K uncached tokens queued on e0: ~1.8 s of prefill
    assert p.ledger.local("http://e0") == 60_000
    d = p.choose(req(shared), cands, 0.0)
    assert (d.engine.url, d.reason) == ("http://e1", "load")
    p.on_finish(big, d, ok=True)
    d = p.choose(req(shared), cands, 0.0)
    assert (d.engine.url, d.reason) == ("http://e0", "cache_hit")


def test_session_bonus_keeps_a_conversation_together_on_a_tie() -> None:
    p, cands = policy(explore_rate=0.0), engines(4)
    prompt = chat(SYSTEM, "first turn")
    for e in cands:  # every engine holds the prefix: a tie the session breaks
        p.index.apply(e.url, [stored(prompt)])
    first = route(p, cands, req(prompt, session="s1"))
    assert {route(p, cands, req(prompt, session="s1")) for _ in range(10)} == {first}


def test_engines_without_events_are_tracked_approximately() -> None:
    p, cands = policy(explore_rate=0.0), engines(3, events=False)
    prompt = chat(SYSTEM, "no events here")
    first = route(p, cands, req(prompt))
    d = p.choose(req(prompt), cands, 100.0)  # long after any speculative TTL
    assert (d.engine.url, d.reason) == (first, "cache_hit")


def _replay_run(seed: int, stream: list[tuple[str, list[KVEvent]]], prompts: list[list[int]]) -> list[str]:
    p, cands = policy(seed=seed, explore_rate=0.2), engines(4)
    rng = random.Random(42)
    out, ids = [], itertools.count()
    for step, prompt in enumerate(prompts):
        if step < len(stream):
            p.index.apply(*stream[step])
        r = RequestFeatures(model=MODEL, request_id=f"q{next(ids)}", prompt_token_ids=prompt)
        p.test_clock[0] = step * 0.05  # type: ignore[attr-defined]
        d = p.choose(r, cands, step * 0.05)
        p.on_dispatch(r, d)
        out.append(f"{d.engine.url}/{d.reason}")
        if rng.random() < 0.5:
            p.on_finish(r, d, ok=True)
    return out


def test_two_replicas_fed_the_same_events_decide_the_same() -> None:
    groups = [chat(f"group {g} " * 40, "") for g in range(6)]
    prompts = [groups[i % 6] + chat("", f"question {i}")[1:] for i in range(120)]
    stream: list[tuple[str, list[KVEvent]]] = [
        (f"http://e{i % 4}", [stored(groups[(i * 5) % 6])]) for i in range(40)
    ]
    a, b = _replay_run(7, stream, prompts), _replay_run(7, stream, prompts)
    assert a == b
    assert len({x.rsplit("/", 1)[0] for x in a}) == 4  # not vacuous: decisions vary
    assert {x.rsplit("/", 1)[1] for x in a} >= {"cache_hit", "explore"}
    assert _replay_run(8, stream, prompts) != a  # the seed matters (exploration)


def test_expected_hit_is_the_best_candidates_hit_and_decides_nothing() -> None:
    """Flow control's cost estimate before routing: the prompt less the best engine's cached prefix."""
    p, cands = policy(explore_rate=0.0), engines(4)
    prompt = chat(SYSTEM, "What is a KV cache?")
    r = req(prompt + chat("", "again")[1:])
    assert p.expected_hit(r, cands, 0.0).tokens == 0.0  # nothing cached anywhere
    p.index.apply("http://e2", [stored(prompt)])
    p.index.apply("http://e1", [stored(prompt[: 2 * BS])])
    assert p.expected_hit(r, cands, 0.0).tokens == len(prompt) // BS * BS
    assert p.expected_hit(r, [cands[1]], 0.0).tokens == 2 * BS  # only among the candidates given
    assert p.stats.decisions == 0 and not p._pending  # no decision was made or remembered
