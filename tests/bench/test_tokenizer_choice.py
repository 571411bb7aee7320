"""Which router tokenizers a benchmark can run against its engines (``kvstack.bench.tokenizer_choice``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstack.bench.tokenizer_choice import TokenizerChoiceError, check_tokenizer

HERE = Path(__file__).parent


@pytest.mark.parametrize(
    ("tokenizer", "path", "simulated", "refused_on"),
    [
        ("builtin", None, True, None),
        ("engine", None, True, None),  # the simulators' /tokenize: their own ids
        ("engine", None, False, None),
        ("local", HERE, False, None),  # real engines load the same files
        ("local", HERE, True, "--tokenizer"),  # the simulators never produce a model's ids
        ("local", None, False, "--tokenizer-path"),
        ("local", HERE / "no-such-folder", False, "--tokenizer-path"),
        ("hf", None, False, "--tokenizer"),
    ],
)
def test_a_tokenizer_is_refused_unless_it_can_give_the_engines_ids(
    tokenizer: str, path: Path | None, simulated: bool, refused_on: str | None
) -> None:
    if refused_on is None:
        check_tokenizer(tokenizer, path, simulated=simulated)
        return
    with pytest.raises(TokenizerChoiceError) as err:
        check_tokenizer(tokenizer, path, simulated=simulated)
    assert err.value.option == refused_on


def test_bench_gpu_refuses_a_local_tokenizer_in_front_of_simulators() -> None:
    from typer.testing import CliRunner

    from kvstack.cli import app

    args = ["bench", "gpu", "--sims", "2", "--tokenizer", "local", "--tokenizer-path", str(HERE), "--dry-run"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "built-in tokenizer" in result.output
    # the same plan with the simulators' own tokenizer is accepted
    ok = CliRunner().invoke(app, [*args[:4], "--tokenizer", "engine", "--dry-run"], env={"COLUMNS": "200"})
    assert ok.exit_code == 0, ok.output
