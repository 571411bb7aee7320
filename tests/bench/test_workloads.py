import math
import random

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


@pytest.mark.parametrize("name", workloads.WORKLOADS)
@pytest.mark.parametrize("fill", [0.75, 0.95])
def test_fill_overrides_the_regimes_working_set(name: str, fill: float) -> None:
    w = workloads.build(name, 262_144, "pressured", fill=fill)
    assert w.fill == pytest.approx(fill, abs=0.03)  # whole users, groups or documents
    default = workloads.build(name, 262_144, "pressured").fill
    assert (w.fill > default) == (fill > workloads.REGIME_FILL["pressured"])


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


@pytest.mark.parametrize(
    ("load", "prefill", "prompt", "expected"),
    [
        (0.75, 136_000, 4000, 25.5),  # 75% of four H200s' cold prefill in 4K-token prompts
        (1.0, 34_000, 34_000, 1.0),
        (0.5, 34_000, 0, 17_000),  # an empty prompt still counts as one token
    ],
)
def test_request_rate(load: float, prefill: float, prompt: float, expected: float) -> None:
    assert workloads.request_rate(load, prefill, prompt) == pytest.approx(expected)


@pytest.mark.parametrize("name", workloads.WORKLOADS)
def test_rate_offers_the_load_and_quick_runs_keep_it(name: str) -> None:
    full = workloads.build(name, 262_144, "pressured", prefill_tokens_per_s=136_000, load=0.75)
    quick = workloads.build(name, 262_144, "pressured", prefill_tokens_per_s=136_000, load=0.75, scale=0.3)
    prompts = []
    for s in full.sessions:
        history = len(tokenizer.encode(s.system))
        for t in s.turns:
            history += len(tokenizer.encode(t.user))
            prompts.append(history)
            history += t.max_tokens
    offered = full.notes["request_rate"] * sum(prompts) / len(prompts)
    assert offered == pytest.approx(0.75 * 136_000, rel=0.1)
    assert quick.notes["request_rate"] == pytest.approx(full.notes["request_rate"], rel=0.05)
    assert workloads.build(name, 262_144, "pressured", load=1.5).notes["request_rate"] == pytest.approx(
        2 * full.notes["request_rate"]
    )


@pytest.mark.parametrize(
    ("name", "per_prefix"),
    [("shared_prefix", 16), ("long_doc_qa", 8), ("long_doc_qa_interleave", 8)],
)
def test_first_reads_are_under_a_tenth_of_requests(name: str, per_prefix: int) -> None:
    # p90 TTFT must be able to look past the necessarily cold first read of each prefix
    w = workloads.build(name, 262_144, "pressured")
    systems = [s.system for s in w.sessions]
    assert len(systems) == per_prefix * len(set(systems))
    assert len(set(systems)) / len(systems) <= 0.125


def test_interleaved_documents_are_each_asked_once_per_pass() -> None:
    w = workloads.build("long_doc_qa_interleave", 262_144, "pressured")
    docs = [s.system for s in sorted(w.sessions, key=lambda s: s.start)]
    n = len(set(docs))
    passes = [docs[i : i + n] for i in range(0, len(docs), n)]
    assert len(passes) == 8
    assert all(p == passes[0] and len(set(p)) == n for p in passes)  # the same cycle, every document
    random_order = workloads.build("long_doc_qa", 262_144, "pressured")
    assert sorted(docs) == sorted(s.system for s in random_order.sessions)  # the same documents


def test_multi_round_users_share_the_system_prompt_then_diverge() -> None:
    w = workloads.build("multi_round_qa", 262_144, "under")
    a, b = w.sessions[0].system, w.sessions[1].system
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert 4000 <= shared < 4004  # the 1000-token shared prompt (4 characters a word), then a new word
    assert len(tokenizer.encode(a)) == 3000


def _session(sid: str, system: str, start: float, turns: int = 1) -> workloads.Session:
    return workloads.Session(sid, system, [workloads.Turn("q", 4)] * turns, start)


@pytest.mark.parametrize(
    ("sessions", "expected"),
    [
        # the earliest session with a system text is its first read, whatever the list order
        ([_session("b", "X", 2.0), _session("a", "X", 1.0)], {("a", 0)}),
        ([_session("a", "X", 1.0), _session("b", "Y", 2.0)], {("a", 0), ("b", 0)}),
        # later turns of a conversation extend a prefix it already sent
        ([_session("a", "X", 1.0, turns=3)], {("a", 0)}),
        ([], set()),
    ],
)
def test_first_reads(sessions: list[workloads.Session], expected: set[tuple[str, int]]) -> None:
    w = workloads.Workload("t", "under", sessions, 1, 1)
    assert workloads.first_reads(w) == expected


@pytest.mark.parametrize(
    ("finish_reason", "completion_tokens", "error", "ok"),
    [
        ("length", 32, "", True),
        ("length", 0, "", True),  # no usage chunk: the finish reason decides
        ("error", 5, "", False),  # vLLM failing a request whose LMCache KV load failed
        ("abort", 5, "", False),
        (None, 0, "", False),  # the stream ended without a finish reason
        ("length", 10, "", False),  # fewer tokens than asked for under ignore_eos
        ("length", 32, '{"message": "engine gone"}', False),  # the router's error event
    ],
)
def test_a_stream_counts_as_success_only_when_it_really_finished(
    finish_reason: str | None, completion_tokens: int, error: str, ok: bool
) -> None:
    from kvstack.bench.driver import stream_succeeded

    assert stream_succeeded(finish_reason, completion_tokens, 32, error)[0] is ok


def test_quantile_ratio_interval() -> None:
    rng = random.Random(5)
    base = [rng.uniform(10, 30) for _ in range(400)]
    low, high = stats.quantile_ratio_interval(base, base)
    assert low < 1.0 < high
    low, high = stats.quantile_ratio_interval([2 * x for x in base], base)
    assert 1.8 < low < 2.0 < high < 2.2
    # a fixed seed: one result file always gives one interval
    assert stats.quantile_ratio_interval(base, base) == stats.quantile_ratio_interval(base, base)
    assert all(math.isnan(x) for x in stats.quantile_ratio_interval([], base))
