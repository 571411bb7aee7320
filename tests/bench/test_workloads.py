import math

import pytest

from kvstack.bench import stats, workloads
from kvstack.common import tokenizer


@pytest.mark.parametrize("name", workloads.WORKLOADS)
@pytest.mark.parametrize("regime", ["under", "pressured"])
def test_regimes_size_the_working_set(name: str, regime: workloads.Regime) -> None:
    w = workloads.build(name, 200_000, regime)
    if regime == "under":
        assert w.fill <= 0.6
    else:
        assert w.fill >= 0.7
    assert w.num_requests > 0
    starts = [s.start for s in w.sessions]
    assert starts == sorted(starts) or name != "multi_round_qa"


def test_words_are_one_token_each() -> None:
    import random

    text = workloads.words(random.Random(0), 500)
    assert len(tokenizer.encode(text)) == 500


def test_builds_are_deterministic() -> None:
    a = workloads.build("shared_prefix", 100_000, "pressured")
    b = workloads.build("shared_prefix", 100_000, "pressured")
    assert [s.system for s in a.sessions] == [s.system for s in b.sessions]
    assert [t.user for s in a.sessions for t in s.turns] == [t.user for s in b.sessions for t in s.turns]


def test_unknown_workload() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        workloads.build("nope", 1, "under")


@pytest.mark.parametrize(
    ("prompts", "outputs", "expected"),
    [
        # first request never hits; an identical second one hits all full blocks but the last token's
        ([list(range(64)), list(range(64))], [[], []], [0, 48]),
        # a prompt extending a previous prompt + output hits through the output's full blocks
        ([list(range(32)), [*range(64), 7]], [list(range(32, 64)), []], [0, 64]),
        # a diverging first block stops the match at once
        ([list(range(64)), [99, *range(1, 64)]], [[], []], [0, 0]),
        # shorter than one block: nothing to hit
        ([list(range(10)), list(range(10))], [[], []], [0, 0]),
    ],
)
def test_oracle_hits(prompts: list[list[int]], outputs: list[list[int]], expected: list[int]) -> None:
    assert workloads.oracle_hit_tokens(prompts, outputs, 16) == expected


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1.0], 50, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
        ([0.0, 10.0], 90, 9.0),
    ],
)
def test_percentile(values: list[float], q: float, expected: float) -> None:
    assert stats.percentile(values, q) == pytest.approx(expected)


def test_percentile_empty_and_cv() -> None:
    assert math.isnan(stats.percentile([], 50))
    assert stats.coefficient_of_variation([5, 5, 5]) == 0
    assert stats.coefficient_of_variation([0, 10]) == pytest.approx(1.0)
    assert stats.coefficient_of_variation([]) == 0
