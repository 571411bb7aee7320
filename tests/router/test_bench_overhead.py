"""``kvstack bench router``: the pure parts (request bodies, window summaries, verdicts), and short
real runs of its load process against a simulator."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvstack.bench import router_overhead as ro
from kvstack.bench.router_load import Load, body, run_load, summarize
from kvstack.bench.router_overhead import long_stream_load
from kvstack.bench.router_overhead_report import verdict
from kvstack.bench.sglang_router import sglang_router, sglang_workers_healthy, wait_sglang_workers
from kvstack.common.procs import running

from .conftest import run_sims

LOAD = Load(("http://x",), seconds=10.0, warmup=2.0, rate=100.0)


def test_bodies_repeat_64_prompts_unless_unique() -> None:
    repeat = {body(i, LOAD)["messages"][1]["content"] for i in range(200)}
    unique = {body(i, Load(("u",), 1, 0, unique=True))["messages"][1]["content"] for i in range(200)}
    assert (len(repeat), len(unique)) == (64, 200)
    b = body(0, Load(("u",), 1, 0, stream=True, max_tokens=32))
    assert (b["stream"], b["max_tokens"], b["ignore_eos"]) == (True, 32, True)


@pytest.mark.parametrize(
    ("samples", "requests", "errors", "p50"),
    [
        ([], 0, 0, math.nan),
        ([(1.0, 0.5, True, 0)], 0, 0, math.nan),  # in the warm-up: not counted
        ([(2.0, 0.010, True, 0), (3.0, 0.020, True, 0), (4.0, 0.5, False, 0)], 2, 1, 15.0),
        ([(11.9, 0.001, True, 0), (12.0, 0.001, True, 0)], 1, 0, 1.0),  # started after the window
    ],
)
def test_summarize_counts_the_window_only(
    samples: list[tuple[float, float, bool, int]], requests: int, errors: int, p50: float
) -> None:
    row = summarize(samples, LOAD, 0.5, 0.1, 3.0, [])
    assert (row["requests"], row["errors"]) == (requests, errors)
    assert row["rps"] == requests / LOAD.seconds
    assert (math.isnan(p50) and math.isnan(row["p50_ms"])) or row["p50_ms"] == pytest.approx(p50)


def _row(open_p50: float, open_p99: float, ns: list[float], s: list[float], rss: list[Any]) -> dict[str, Any]:
    return {
        "backend": "b",
        "open": {"p50_ms": open_p50, "p99_ms": open_p99},
        "closed_nonstream": [{"rps": x} for x in ns],
        "closed_stream": [{"rps": x} for x in s],
        "soak": {"rss_mb": rss},
    }


@pytest.mark.parametrize(
    ("row", "latency_ok", "rps_ok"),
    [
        (_row(1.5, 6.0, [900, 1200], [600], []), True, True),
        (_row(1.7, 6.0, [1200], [600], []), False, True),  # p50 adds 1.2 ms
        (_row(1.5, 12.0, [1200], [600], []), False, True),  # p99 adds 7 ms
        (_row(1.5, 6.0, [999], [600], []), True, False),
        (_row(1.5, 6.0, [1200], [499], []), True, False),
    ],
)
def test_verdict_against_the_goals(row: dict[str, Any], latency_ok: bool, rps_ok: bool) -> None:
    v = verdict({"p50_ms": 0.5, "p99_ms": 5.0}, row)
    assert (v["meets_latency"], v["meets_rps"]) == (latency_ok, rps_ok)
    assert v["added_p50_ms"] == pytest.approx(row["open"]["p50_ms"] - 0.5)


def test_rss_growth_is_measured_over_the_second_half() -> None:
    rss = [(0.0, 100.0), (60.0, 140.0), (120.0, 150.0), (180.0, 150.0), (240.0, 150.0)]
    v = verdict({"p50_ms": 0.0, "p99_ms": 0.0}, _row(0, 0, [1], [1], rss))
    assert (v["rss_start_mb"], v["rss_end_mb"]) == (100.0, 150.0)
    assert v["rss_growth_mb_per_min_2nd_half"] == 0.0  # warmed up, then flat


def test_load_process_measures_a_real_simulator(tmp_path: Path) -> None:
    with run_sims(tmp_path, 1, "--served-model-name", "sim", "--speed", "100") as (sim,):
        plain = run_load(Load((sim.url,), seconds=1.0, warmup=0.2, concurrency=2), None)
        streamed = run_load(Load((sim.url,), seconds=1.0, warmup=0.2, rate=20, stream=True), None)
        wrong = run_load(Load((sim.url + "/nowhere",), seconds=0.5, warmup=0.1, concurrency=1), None)
    assert plain["requests"] > 0 and plain["errors"] == 0 and plain["load_cpu"] > 0
    assert streamed["errors"] == 0 and streamed["chunks_per_request"] >= 1
    assert 15 <= streamed["requests"] <= 25  # open loop: the rate, whatever the server does
    assert wrong["requests"] == 0 and wrong["errors"] > 0  # failures are counted, never hidden


@pytest.mark.parametrize(
    ("load", "clients", "rates"),
    [
        (Load(("u",), 1, 0, concurrency=32), [32], [0.0]),
        (Load(("u",), 1, 0, concurrency=32, procs=3), [11, 11, 10], [0.0] * 3),
        (Load(("u",), 1, 0, concurrency=2, procs=4), [1, 1], [0.0] * 2),  # no process without a client
        (Load(("u",), 1, 0, rate=200.0, procs=4), [0] * 4, [50.0] * 4),
        (Load(("u",), 1, 0, rate=200.0), [0], [200.0]),
    ],
)
def test_a_phase_is_shared_by_its_load_processes(load: Load, clients: list[int], rates: list[float]) -> None:
    shares = load.shares()
    assert [s.concurrency for s in shares] == clients and [s.rate for s in shares] == rates
    assert {s.procs for s in shares} == {len(shares)}  # each interleaves its request numbers with the others'


def test_several_load_processes_measure_a_real_simulator_together(tmp_path: Path) -> None:
    with run_sims(tmp_path, 1, "--served-model-name", "sim", "--speed", "100") as (sim,):
        closed = run_load(Load((sim.url,), seconds=1.0, warmup=0.2, concurrency=4, procs=2), None)
        opened = run_load(Load((sim.url,), seconds=1.0, warmup=0.2, rate=40, procs=2), None)
    assert closed["load_procs"] == 2 and closed["errors"] == 0
    assert all(n > 0 for n in closed["requests_per_proc"])  # both processes sent requests
    assert sum(closed["requests_per_proc"]) == closed["requests"]
    assert opened["load_procs"] == 2 and 30 <= opened["requests"] <= 50  # 20 req/s from each


def test_cpu_per_request_is_the_routers_cpu_over_its_rate() -> None:
    row = summarize([(2.0 + i / 100, 0.001, True, 0) for i in range(500)], LOAD, 0.5, 0.1, 3.0, [])
    assert row["rps"] == 50.0
    assert row["router_cpu_ms_per_request"] == pytest.approx(10.0)  # half a core over 50 req/s
    assert summarize([], LOAD, 0.5, 0.1, 3.0, [])["router_cpu_ms_per_request"] == 0.0
    levels = [
        {"rps": 900.0, "router_cpu_ms_per_request": 0.4},
        {"rps": 1200.0, "router_cpu_ms_per_request": 0.3},
    ]
    v = verdict({"p50_ms": 0.0, "p99_ms": 0.0}, {**_row(1, 1, [], [1], []), "closed_nonstream": levels})
    assert v["cpu_ms_per_request"] == 0.3  # at the highest sustained rate


@pytest.mark.parametrize(
    ("answer", "healthy"),
    [
        ({"workers": [{"is_healthy": True}, {"is_healthy": True}]}, True),
        ({"workers": [{"is_healthy": True}, {"is_healthy": False}]}, False),
        ({"workers": [{"is_healthy": True}]}, False),  # the second not registered yet
        ({"workers": []}, False),
        ({"error": "nope"}, False),
        ([], False),
    ],
)
def test_sglang_router_is_ready_when_every_worker_is_healthy(answer: Any, healthy: bool) -> None:
    assert sglang_workers_healthy(answer, 2) is healthy


def test_the_sglang_baseline_routes_to_real_simulators(tmp_path: Path) -> None:
    with run_sims(tmp_path, 2, "--served-model-name", "sim", "--speed", "100") as sims:
        urls = [s.url for s in sims]
        router = sglang_router("cache_aware", urls, tmp_path / "logs")
        with running([router]):
            wait_sglang_workers(router, len(urls))
            base = str(router.ready_url).rsplit("/", 1)[0]
            out = run_load(Load((base,), seconds=1.0, warmup=0.2, concurrency=2), router.pid)
        served = [s.metric("vllm:request_success_total") for s in sims]
    # (no CPU check: a second of this light load can land between the kernel's accounting ticks)
    assert out["requests"] > 0 and out["errors"] == 0
    assert sum(served) >= out["requests"]  # the simulators answered what went through it


def test_planned_seconds_cover_every_phase() -> None:
    cfg = {"warmup": 2.0, "seconds": 10.0, "concurrency": [32, 128], "soak_seconds": 600.0}
    # direct: open + two closed phases; per router: open, 2 x 2 closed, then the soak
    assert ro.planned_seconds(cfg, routers=4) == 3 * 12 + 4 * (5 * 12 + 602)
    assert ro.planned_seconds({**cfg, "soak_seconds": 0.0}, routers=1) == 3 * 12 + 5 * 12
    # the long-stream phase: direct and through each router
    long = {**cfg, "soak_seconds": 0.0, "long_stream_tokens": 100}
    assert ro.planned_seconds(long, routers=2) == 3 * 12 + 2 * 5 * 12 + 3 * 12


def test_the_long_stream_phase_streams_its_tokens_open_loop() -> None:
    cfg = {
        "seconds": 5.0,
        "warmup": 1.0,
        "long_stream_rate": 50.0,
        "long_stream_tokens": 100,
        "load_procs": 2,
    }
    load = long_stream_load(("http://r",), cfg)
    assert (load.rate, load.concurrency, load.stream, load.max_tokens) == (50.0, 0, True, 100)
    assert [share.rate for share in load.shares()] == [25.0, 25.0]
    assert body(3, load)["max_tokens"] == 100


def test_cpu_per_long_stream_and_per_chunk() -> None:
    long = {"rps": 100.0, "router_cpu_ms_per_request": 4.0, "chunks_per_request": 100.0}
    v = verdict({"p50_ms": 0.0, "p99_ms": 0.0}, {**_row(1, 1, [1], [1], []), "stream_long": long})
    assert (v["cpu_ms_per_long_stream"], v["cpu_us_per_chunk"]) == (4.0, 40.0)
    none = verdict({"p50_ms": 0.0, "p99_ms": 0.0}, _row(1, 1, [1], [1], []))  # the phase was skipped
    assert math.isnan(none["cpu_ms_per_long_stream"]) and math.isnan(none["cpu_us_per_chunk"])
    failed = verdict(
        {"p50_ms": 0.0, "p99_ms": 0.0},
        {**_row(1, 1, [1], [1], []), "stream_long": {**long, "rps": 0.0, "chunks_per_request": 0.0}},
    )
    assert math.isnan(failed["cpu_us_per_chunk"])  # nothing got through: no figure, not zero


@pytest.mark.slow
def test_a_short_run_reports_progress_to_the_end_in_plain_lines(tmp_path: Path) -> None:
    """Piped (as in CI): no bar and no control characters, a plain line per tenth up to 100%."""
    args = ["bench", "router", "--backend", "aiohttp", "--sglang", "none", "--concurrency", "4"]
    args += ["--seconds", "1", "--warmup", "0.5", "--soak-seconds", "0", "--out-dir", str(tmp_path)]
    args += ["--long-stream-tokens", "20", "--long-stream-rate", "10"]
    kvstack = str(Path(sys.executable).with_name("kvstack"))
    out = subprocess.run([kvstack, *args], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    progress = [line for line in out.stdout.splitlines() if line.startswith("bench router: ")]
    assert progress[-1].startswith("bench router: 100% (12/12 s planned)"), progress
    assert len(progress) == 8  # 8 phases of 1.5 s, each past a new tenth: one line per phase
    assert "\x1b" not in out.stdout + out.stderr and "\r" not in out.stdout + out.stderr
