"""Benchmark progress: a bar for people at a terminal, plain lines with an ETA everywhere else."""

from __future__ import annotations

import io

import pytest

from kvstack.bench.progress import BenchProgress, eta_seconds, interactive, plain_line


class Clock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_says_every_tenth_once_with_an_eta() -> None:
    lines: list[str] = []
    clock = Clock()
    with BenchProgress(
        "bench routing", 200, "requests", show_bar=False, say=lines.append, clock=clock
    ) as bar:
        for _ in range(200):
            clock.now += 0.5  # one request every half second: 100 s in all
            bar.advance()
    assert len(lines) == 10
    assert lines[0] == "bench routing: 10% (20/200 requests), 0:10 elapsed, ETA 1:30"
    assert lines[4] == "bench routing: 50% (100/200 requests), 0:50 elapsed, ETA 0:50"
    assert lines[-1] == "bench routing: 100% (200/200 requests), 1:40 elapsed, ETA 0:00"
    assert not any(c in "".join(lines) for c in "\x1b\r")  # nothing a CI log would show as noise


def test_a_jump_past_several_tenths_says_one_line() -> None:
    lines: list[str] = []
    with BenchProgress("soak", 600, "s", show_bar=False, say=lines.append, clock=Clock()) as bar:
        bar.update(250)  # time-based benchmarks set where they are
        bar.update(700)  # never past the end
    assert [line.split(":")[1].split("(")[0].strip() for line in lines] == ["42%", "100%"]
    assert bar.done == 600


@pytest.mark.parametrize(
    ("done", "total", "elapsed", "eta"),
    [(0, 10, 5.0, None), (5, 10, 5.0, 5.0), (10, 10, 7.0, 0.0), (1, 4, 0.0, None)],
)
def test_eta(done: float, total: float, elapsed: float, eta: float | None) -> None:
    assert eta_seconds(done, total, elapsed) == eta


def test_hours_in_the_plain_line() -> None:
    assert plain_line("gpu", 1, 4, "requests", 3600.0).endswith("1:00:00 elapsed, ETA 3:00:00")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream", "env", "expected"),
    [
        (Tty(), {"TERM": "xterm"}, True),
        (io.StringIO(), {"TERM": "xterm"}, False),  # a pipe or a file
        (Tty(), {"TERM": "xterm", "CI": "true"}, False),
        (Tty(), {"TERM": "xterm", "CI": "0"}, True),
        (Tty(), {"TERM": "dumb"}, False),
    ],
)
def test_a_bar_only_for_a_person_at_a_terminal(
    stream: io.StringIO, env: dict[str, str], expected: bool
) -> None:
    assert interactive(stream, env) is expected


def test_the_bar_draws_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with BenchProgress("bench gpu", 4, "requests", show_bar=True) as bar:
        for _ in range(4):
            bar.advance()
    assert bar.done == 4
    assert "bench gpu" in capsys.readouterr().err


def test_the_benchmarks_own_lines_go_to_stdout_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    with BenchProgress("bench gpu", 2, "requests", show_bar=False, say=lambda _line: None) as bar:
        bar.log("[h200] multi_round_qa / cache_aware: 2 requests ...")
    assert capsys.readouterr().out == "[h200] multi_round_qa / cache_aware: 2 requests ...\n"
