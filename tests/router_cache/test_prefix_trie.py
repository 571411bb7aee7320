"""The prefix_trie baseline (production-stack's prefixaware): text chunks, random among matches."""

from __future__ import annotations

import random

import pytest

from kvstack.router.engines import Endpoint, EngineState
from kvstack.router.policies.base import RequestFeatures
from kvstack.router.policies.prefix_trie import HashTrie, PrefixTriePolicy, PrefixTrieSettings

DOC = "".join(f"Paragraph {i} of the shared document says something. " for i in range(20))  # ~1000 chars


def engines(n: int, loads: list[int] | None = None, port: int = 80) -> list[EngineState]:
    out = []
    for i in range(n):
        ep = Endpoint(url=f"http://e{i}:{port + i}", name=f"e{i}", models=frozenset({"m"}))
        out.append(EngineState(endpoint=ep, models=ep.models, own_in_flight=(loads or [0] * n)[i]))
    return out


def req(text: str) -> RequestFeatures:
    return RequestFeatures(model="m", request_id="r", prompt_text=text)


@pytest.mark.parametrize(
    ("inserted", "query", "available", "matched", "holders"),
    [
        ([(DOC, "a")], DOC, {"a", "b"}, len(DOC), {"a"}),
        ([(DOC, "a")], DOC + " and a question", {"a"}, len(DOC) // 128 * 128, {"a"}),
        ([(DOC, "a")], "x" + DOC, {"a"}, 0, set()),  # position-dependent: a shifted text misses
        ([(DOC, "a"), (DOC[:300], "b")], DOC, {"a", "b"}, len(DOC), {"a"}),
        ([(DOC[:300], "a"), (DOC[:300], "b")], DOC[:300], {"a", "b"}, 300, {"a", "b"}),
        ([(DOC, "a")], DOC, {"b"}, 0, set()),  # a gone engine never matches
        ([(DOC[:100], "a")], DOC, {"a"}, 0, set()),  # a short first chunk hashes differently
    ],
)
def test_longest_match(
    inserted: list[tuple[str, str]], query: str, available: set[str], matched: int, holders: set[str]
) -> None:
    trie = HashTrie(128)
    for text, engine in inserted:
        trie.insert(text, engine)
    assert trie.longest_match(query, available) == (matched, holders)


def test_repeats_follow_the_first_pick_and_new_texts_are_random() -> None:
    p, cands = PrefixTriePolicy(rng=random.Random(0)), engines(4)
    first = p.choose(req(DOC), cands, 0.0)
    assert first.reason == "no_match"
    again = [p.choose(req(DOC + f" q{i}"), cands, 0.0) for i in range(10)]
    assert {(d.engine.url, d.reason) for d in again} == {(first.engine.url, "prefix")}
    assert again[0].predicted_hit_tokens == len(DOC) // 128 * 128 // 3
    cold = {p.choose(req(f"{i} " + DOC), cands, 0.0).engine.url for i in range(40)}
    assert len(cold) == 4  # random, not the first engine every time


def test_it_ignores_load_like_the_original() -> None:
    p, cands = PrefixTriePolicy(rng=random.Random(1)), engines(2, loads=[0, 0])
    first = p.choose(req(DOC), cands, 0.0).engine
    first.in_flight = 1000
    assert p.choose(req(DOC), cands, 0.0).engine is first


def test_short_matches_fall_back_to_the_least_loaded() -> None:
    p = PrefixTriePolicy(PrefixTrieSettings(min_match_chars=512), rng=random.Random(2))
    cands = engines(3, loads=[5, 0, 5])
    p.trie.insert(DOC[:256], cands[0].url)
    d = p.choose(req(DOC[:256]), cands, 0.0)
    assert (d.engine.name, d.reason) == ("e1", "below_min_match")


def test_node_count_is_capped() -> None:
    trie = HashTrie(128, max_nodes=50)
    for i in range(100):
        trie.insert(f"{i} " + DOC, "a")
    assert trie.nodes == 50
    assert trie.longest_match(f"{0} " + DOC, {"a"})[0] > 0


def test_a_seed_places_texts_alike_whatever_order_they_arrive_in() -> None:
    """Concurrent requests reach the router in an order a busy machine reshuffles, and each run's
    engines listen on new ports; a seeded run must still repeat its placement (by engine name), and
    another seed must draw apart."""
    texts = [f"group {g} " + DOC for g in range(32)]

    def placement(seed: int, order: list[str], cands: list[EngineState]) -> dict[str, str]:
        p = PrefixTriePolicy(PrefixTrieSettings(seed=seed))
        return {t: p.choose(req(t), cands, 0.0).engine.name for t in order}

    base = placement(7, texts, engines(4))
    assert placement(7, texts[::-1], engines(4, port=9000)[::-1]) == base
    assert placement(7, random.Random(1).sample(texts, len(texts)), engines(4)) == base
    assert placement(8, texts, engines(4)) != base
    assert len(set(base.values())) == 4  # still spread at random
