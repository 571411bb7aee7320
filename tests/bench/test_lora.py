"""The LoRA benchmark's pure parts: Zipf popularity, the adapters' placement, the seeded trace."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from kvstack.bench.lora import LoraSetup, adapter_name, make_trace, placement, zipf_weights


@pytest.mark.parametrize(("n", "s"), [(1, 1.0), (5, 0.0), (20, 1.0), (20, 1.5)])
def test_zipf_weights_sum_to_one_and_fall_with_rank(n: int, s: float) -> None:
    w = zipf_weights(n, s)
    assert len(w) == n and sum(w) == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(w))
    if s == 0.0:
        assert w == pytest.approx([1 / n] * n)


def test_zipf_one_makes_the_first_rank_twice_the_second() -> None:
    w = zipf_weights(20, 1.0)
    assert w[0] == pytest.approx(2 * w[1])


@pytest.mark.parametrize(
    ("mode", "per_engine", "copies"),
    [("cache_aware", 20, 4), ("round_robin", 20, 4), ("name_only", 10, 2)],
)
def test_placement(mode: str, per_engine: int, copies: int) -> None:
    held = placement(mode, 20, 4)
    assert [len(h) for h in held] == [per_engine] * 4
    counts = Counter(a for h in held for a in h)
    assert set(counts) == {adapter_name(i) for i in range(20)}
    assert set(counts.values()) == {copies}


def test_the_trace_is_seeded_and_shares_only_the_system_prompt_across_adapters() -> None:
    setup = LoraSetup(requests=60, shared_tokens=64, adapter_tokens=64, question_tokens=8)
    a, b = make_trace(setup), make_trace(setup)
    assert a == b
    assert all(x.at < y.at for x, y in itertools.pairwise(a))
    popular = Counter(r.adapter for r in a).most_common(1)[0][0]
    assert popular == adapter_name(0)
    by_adapter = {r.adapter: r.prompt.split("\n") for r in a}
    shared = {parts[0] for parts in by_adapter.values()}
    own = {parts[1] for parts in by_adapter.values()}
    assert len(shared) == 1 and len(own) == len(by_adapter)
