"""``kvstack bench sim``: how many streamed requests per second one simulator process sustains.

One ``kvstack engine sim`` process runs at a high speed factor, so the engine model is nearly free and
the HTTP/SSE path dominates. A separate load process (aiohttp, closed loop, N concurrent streams of
short prompts with ``ignore_eos`` and a fixed number of output tokens) measures completed requests per
second, TTFT and chunks per second over a steady window after a warm-up; the simulator's CPU use over
the window tells whether it was the bottleneck. Results: JSON + PNG under ``bench-results/sim/``.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from kvstack.bench.report import print_table, save_figure, write_json
from kvstack.bench.stats import percentile
from kvstack.common.procs import cpu_seconds

GOAL_RPS = 300.0


@dataclass(frozen=True, slots=True)
class Sample:
    """One finished streamed request, times relative to the load process's start."""

    start: float
    ttft: float
    end: float
    chunks: int
    ok: bool


@dataclass(frozen=True, slots=True)
class Level:
    """The result of one concurrency level."""

    concurrency: int
    requests: int
    errors: int
    rps: float
    chunks_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    e2e_p50_ms: float
    chunks_per_request: float  # below output_tokens when tokens coalesce (the client lags the engine)
    sim_cpu: float  # simulator CPU seconds per wall second over the window (1.0 = one core)
    load_cpu: float  # the same for the load generator


async def _drive(url: str, concurrency: int, seconds: float, output_tokens: int) -> list[Sample]:
    import aiohttp

    t0 = time.perf_counter()
    stop_at = t0 + seconds
    samples: list[Sample] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)

    async def worker(k: int, session: aiohttp.ClientSession) -> None:
        i = 0
        while time.perf_counter() < stop_at:
            i += 1
            body = {
                "model": "sim",
                "prompt": f"Request {k} {i}: tell me about caches.",
                "max_tokens": output_tokens,
                "ignore_eos": True,
                "stream": True,
            }
            start = time.perf_counter()
            ttft, chunks, ok = -1.0, 0, False
            try:
                async with session.post(url, json=body) as resp:
                    ok = resp.status == 200
                    async for line in resp.content:
                        if line.startswith(b"data: {"):
                            chunks += 1
                            if ttft < 0:
                                ttft = time.perf_counter() - start
            except aiohttp.ClientError:
                ok = False
            end = time.perf_counter()
            samples.append(Sample(start - t0, ttft, end - t0, chunks, ok and chunks > 0))

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(k, session) for k in range(concurrency)))
    return samples


def _load_process(url: str, concurrency: int, seconds: float, output_tokens: int, out: Any) -> None:
    import uvloop

    out.send(uvloop.run(_drive(url, concurrency, seconds, output_tokens)))


def summarize(
    samples: list[Sample], concurrency: int, lo: float, hi: float, sim_cpu: float, load_cpu: float
) -> Level:
    """Requests that finished inside ``[lo, hi)`` (seconds since the load started) make the level."""
    done = [s for s in samples if lo <= s.end < hi]
    good = [s for s in done if s.ok]
    window = hi - lo
    ttfts = [s.ttft * 1000 for s in good]
    return Level(
        concurrency=concurrency,
        requests=len(good),
        errors=len(done) - len(good),
        rps=len(good) / window,
        chunks_per_s=sum(s.chunks for s in good) / window,
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p99_ms=percentile(ttfts, 99),
        e2e_p50_ms=percentile([(s.end - s.start) * 1000 for s in good], 50),
        chunks_per_request=sum(s.chunks for s in good) / max(1, len(good)),
        sim_cpu=sim_cpu,
        load_cpu=load_cpu,
    )


def run_level(
    url: str, pid: int, concurrency: int, warmup: float, seconds: float, output_tokens: int
) -> Level:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_load_process, args=(url, concurrency, warmup + seconds, output_tokens, child))
    proc.start()
    try:
        time.sleep(warmup)
        assert proc.pid is not None
        cpu0, load0, t0 = cpu_seconds(pid), cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - t0
        sim_cpu = (cpu_seconds(pid) - cpu0) / elapsed
        load_cpu = (cpu_seconds(proc.pid) - load0) / elapsed
        samples: list[Sample] = parent.recv()
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    return summarize(samples, concurrency, warmup, warmup + seconds, sim_cpu, load_cpu)


def plot(path: Path, levels: list[Level]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [str(lv.concurrency) for lv in levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.bar(xs, [lv.rps for lv in levels], color="tab:blue")
    ax1.axhline(GOAL_RPS, color="tab:red", linestyle="--", label=f"goal {GOAL_RPS:.0f} req/s")
    ax1.set_xlabel("concurrent streams")
    ax1.set_ylabel("streamed requests / s")
    ax1.legend(fontsize=8)
    ax2.plot(xs, [lv.ttft_p50_ms for lv in levels], marker="o", label="p50")
    ax2.plot(xs, [lv.ttft_p99_ms for lv in levels], marker="o", label="p99")
    ax2.set_xlabel("concurrent streams")
    ax2.set_ylabel("TTFT (ms)")
    ax2.legend(fontsize=8)
    fig.suptitle("One simulator process: streamed throughput", fontsize=10)
    save_figure(fig, path)


def sim_throughput(
    concurrency: Annotated[
        list[int] | None, typer.Option(help="Concurrent streams; repeat for a sweep.")
    ] = None,
    seconds: Annotated[float, typer.Option(help="Measured window per level.")] = 8.0,
    warmup: Annotated[float, typer.Option(help="Warm-up before each window.")] = 2.0,
    output_tokens: Annotated[int, typer.Option(help="Tokens per streamed answer.")] = 32,
    speed: Annotated[float, typer.Option(help="Simulator speed factor.")] = 1000.0,
    out_dir: Annotated[Path, typer.Option(help="Where JSON and PNG go.")] = Path("bench-results/sim"),
    profile: Annotated[
        Path | None, typer.Option(help="Run the simulator under cProfile, stats here.")
    ] = None,
) -> None:
    """Streamed requests/s and TTFT of one simulator process under closed-loop load."""
    from kvstack.common.procs import ManagedProcess, free_port, kvstack_argv, running

    levels_in = concurrency or [32, 128]
    port = free_port()
    argv = [
        *kvstack_argv(),
        "engine",
        "sim",
        "--port",
        str(port),
        "--served-model-name",
        "sim",
        "--speed",
        str(speed),
    ]
    argv += ["--max-num-seqs", "1024", "--max-num-batched-tokens", "16384", "--max-model-len", "4096"]
    if profile is not None:
        argv = [sys.executable, "-m", "cProfile", "-o", str(profile.resolve()), *argv]
    sim = ManagedProcess("sim", argv, out_dir / "logs", ready_url=f"http://127.0.0.1:{port}/health")
    url = f"http://127.0.0.1:{port}/v1/completions"
    levels: list[Level] = []
    with running([sim]):
        for n in levels_in:
            levels.append(run_level(url, sim.pid, n, warmup, seconds, output_tokens))
        if profile is not None and sim.proc is not None:
            # uvicorn re-raises the signal after its shutdown: SIGINT becomes KeyboardInterrupt, which
            # lets cProfile write its stats (SIGTERM would end the process before it can).
            os.kill(sim.pid, signal.SIGINT)
            sim.proc.wait(60)
    rows = [asdict(lv) for lv in levels]
    print_table(
        f"kvstack bench sim: {output_tokens}-token streams, speed x{speed:g}",
        rows,
        [
            "concurrency",
            "requests",
            "errors",
            "rps",
            "chunks_per_request",
            "ttft_p50_ms",
            "ttft_p99_ms",
            "sim_cpu",
            "load_cpu",
        ],
    )
    best = max(lv.rps for lv in levels)
    payload = {
        "benchmark": "sim_throughput",
        "goal_rps": GOAL_RPS,
        "best_rps": best,
        "meets_goal": best >= GOAL_RPS,
        "params": {"seconds": seconds, "warmup": warmup, "output_tokens": output_tokens, "speed": speed},
        "cpu_count": os.cpu_count(),
        "levels": rows,
    }
    write_json(out_dir / "sim_throughput.json", payload)
    plot(out_dir / "sim_throughput.png", levels)
    typer.echo(
        f"best {best:.0f} streamed req/s (goal {GOAL_RPS:.0f}); wrote {out_dir}/sim_throughput.json + .png"
    )
