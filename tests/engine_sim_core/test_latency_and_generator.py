"""The latency model's shape and fit (pure), and the deterministic, re-tokenizable outputs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from kvstack.common.tokenizer import apply_chat_template, decode, encode
from kvstack.engine.sim.config import LatencyParams
from kvstack.engine.sim.generator import STOP_TOKEN_ID, WORD_IDS, output_length, output_seed, token_at
from kvstack.engine.sim.latency import StepWork, frontend_delay, step_time

from .conftest import work

P = LatencyParams()
BUDGET = 8192


def model_ttft(n: int, hit: int) -> float:
    """TTFT of a lone request under the model, chunked like the scheduler does."""
    t = frontend_delay(P, n)
    pos = hit
    while pos < n:
        k = min(BUDGET, n - pos)
        t += step_time(P, work([(k, pos)]))
        pos += k
    return t


@pytest.mark.parametrize(
    ("shorter", "longer"),
    [
        (work([(256, 0)]), work([(4096, 0)])),  # more new tokens
        (work([(512, 0)]), work([(512, 8192)])),  # same tokens, deeper context: attention
        (work(decodes=[100] * 8), work(decodes=[100] * 128)),  # bigger decode batch
        (work(decodes=[100]), work(decodes=[16000])),  # longer decode context
        (work([(16, 0)]), work([(16, 0)], remote_load_tokens=4096)),  # LMCache load
        (work([(16, 0)], cpu_load_tokens=4096), work([(16, 0)], remote_load_tokens=4096)),  # CPU < Redis
        (work([(2048, 0)]), work([(2048, 0)], store_tokens=2048)),  # LMCache store
    ],
)
def test_step_time_grows_with_work(shorter: StepWork, longer: StepWork) -> None:
    assert 0 < step_time(P, shorter) < step_time(P, longer)


def test_an_empty_step_takes_no_time() -> None:
    assert step_time(P, StepWork()) == 0.0


def test_small_decode_batches_are_memory_bound() -> None:
    one, eight = step_time(P, work(decodes=[64])), step_time(P, work(decodes=[64] * 8))
    assert eight < one * 1.1


def _reference(reference_dir: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((reference_dir / "h200-measurements.json").read_text())
    return data


def test_the_fit_matches_every_reference_row(reference_dir: Path) -> None:
    ref = _reference(reference_dir)["single_engine"]
    assert isinstance(ref, dict)
    for row in ref["ttft_by_prompt_len"]:
        n = row["len"]
        assert model_ttft(n, 0) == pytest.approx(row["cold_ttft_s"], rel=0.1)
        assert model_ttft(n, (n - 1) // 16 * 16) == pytest.approx(row["full_hit_ttft_s"], rel=0.1)
        assert model_ttft(n, int(0.9 * n) // 16 * 16) == pytest.approx(row["prefix90_ttft_s"], rel=0.1)
    for row in ref["decode_by_batch"]:
        step = step_time(P, work(decodes=[64] * row["batch"]))
        assert step == pytest.approx(row["itl_p50_s"], rel=0.1)


def test_lmcache_terms_match_the_redis_rows(reference_dir: Path) -> None:
    lm = _reference(reference_dir)["two_engines_lmcache_0.5.3"]
    assert isinstance(lm, dict)
    for row in lm["redis_7.0_remote"]:
        n = row["len"]
        cold = frontend_delay(P, n)
        pos = 0
        while pos < n:
            k = min(BUDGET, n - pos)
            cold += step_time(P, work([(k, pos)], store_tokens=k))
            pos += k
        assert cold == pytest.approx(row["A_cold"], rel=0.15)
        remote = frontend_delay(P, n) + step_time(P, work([(1, n - 1)], remote_load_tokens=n - 1))
        assert remote == pytest.approx(row["B_remote_hit"], rel=0.15)
        assert remote < row["A_cold"] / 2


# -- generated tokens -------------------------------------------------------------------------


def test_every_word_is_one_distinct_token() -> None:
    assert len(set(WORD_IDS)) == len(WORD_IDS) == 4096
    for tid in WORD_IDS[:64]:
        assert encode(decode([tid])) == [tid]


@pytest.mark.parametrize("prefix", ["", "\n\n", "Answer:", "x"])
def test_output_text_tokenizes_back_to_the_same_ids(prefix: str) -> None:
    seed = output_seed([1, 2, 3])
    ids = [token_at(seed, i) for i in range(200)]
    assert encode(prefix + decode(ids))[len(encode(prefix)) :] == ids


def test_a_chat_that_echoes_the_answer_extends_the_same_token_prefix() -> None:
    first = apply_chat_template([("user", "hello there")])
    seed = output_seed(first)
    answer = [token_at(seed, i) for i in range(20)] + [STOP_TOKEN_ID]
    second = apply_chat_template(
        [("user", "hello there"), ("assistant", decode(answer)), ("user", "and then?")]
    )
    assert second[: len(first) + len(answer)] == first + answer


def test_outputs_depend_on_prompt_and_position_only() -> None:
    a, b = output_seed([5, 6, 7]), output_seed([5, 6, 8])
    assert [token_at(a, i) for i in range(32)] == [token_at(output_seed([5, 6, 7]), i) for i in range(32)]
    assert [token_at(a, i) for i in range(32)] != [token_at(b, i) for i in range(32)]
    assert len({token_at(a, i) for i in range(64)}) > 32


@pytest.mark.parametrize(
    ("max_tokens", "mean", "ignore_eos", "expected"),
    [
        (50, None, False, (50, False)),  # no mean: run to max_tokens
        (50, 5.0, True, (50, False)),  # ignore_eos
        (1, 5.0, False, (1, False)),  # capped: "length"
    ],
)
def test_output_length_table(
    max_tokens: int, mean: float | None, ignore_eos: bool, expected: tuple[int, bool]
) -> None:
    assert output_length(123, max_tokens, mean, ignore_eos) == expected


def test_sampled_eos_has_the_configured_mean() -> None:
    lengths = [output_length(output_seed([i]), 10_000, 40.0, False) for i in range(4000)]
    assert all(stop for _, stop in lengths)
    assert statistics.fmean(n for n, _ in lengths) == pytest.approx(40.0, rel=0.08)
    assert min(n for n, _ in lengths) >= 1
