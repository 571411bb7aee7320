"""The load processes of ``kvstack bench router``: one phase of requests from processes of their
own, and the summary of its measured window (requests, latency percentiles, the router's CPU per
request).

Separate processes (aiohttp on uvloop, cheaper per request than the router they measure) send the
requests; this process samples the CPU the router and the load used over the measured window. One
load process tops out near 4,000 requests/s on a fast core, under what several router workers
serve: ``Load.procs`` splits a phase's clients (or its open-loop rate) over that many processes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from kvstack.bench.pacing import open_loop
from kvstack.bench.stats import percentile
from kvstack.common.procs import cpu_seconds, tree_cpu_seconds, tree_memory_mb

MODEL = "sim"
_SYSTEM = "You are a concise assistant for a platform team that runs LLM inference on Kubernetes. " * 4
_TOPICS = ["caches", "routers", "autoscaling", "KV blocks", "prefill", "decode", "Redis", "GPUs"]


@dataclass(frozen=True, slots=True)
class Load:
    """One phase of load: open loop at ``rate`` req/s, or closed loop with ``concurrency`` workers."""

    urls: tuple[str, ...]  # base URLs, used round-robin (the engines themselves, or one router)
    seconds: float
    warmup: float
    rate: float = 0.0
    concurrency: int = 0
    stream: bool = False
    max_tokens: int = 16
    unique: bool = False  # a new prompt every request (soak); else 64 prompts repeat
    procs: int = 1  # load processes sharing the clients (closed loop) or the rate (open loop)

    def shares(self) -> list[Load]:
        """This phase split over its load processes: each its part of the clients or of the rate
        (no process without a client)."""
        n = max(1, min(self.procs, self.concurrency) if self.concurrency else self.procs)
        if self.concurrency:
            counts = [self.concurrency // n + (i < self.concurrency % n) for i in range(n)]
            return [dataclasses.replace(self, concurrency=c, procs=n) for c in counts]
        return [dataclasses.replace(self, rate=self.rate / n, procs=n) for _ in range(n)]


def body(i: int, load: Load) -> dict[str, Any]:
    """The chat request number ``i`` of a phase (a shared system prompt, a varying question)."""
    k = i if load.unique else i % 64
    question = f"Question {k}: what should we know about {_TOPICS[k % len(_TOPICS)]} today?"
    return {
        "model": MODEL,
        "messages": [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": question}],
        "max_tokens": load.max_tokens,
        "ignore_eos": True,
        "stream": load.stream,
    }


async def _drive(load: Load, index: int = 0) -> list[tuple[float, float, bool, int]]:
    """(start, latency, ok, chunks) per request, times relative to the phase start; ``index``: this
    process's place among the phase's ``load.procs`` (their request numbers interleave)."""
    import aiohttp

    samples: list[tuple[float, float, bool, int]] = []
    t0 = time.perf_counter()
    stop_at = t0 + load.warmup + load.seconds
    paths = [f"{u}/v1/chat/completions" for u in load.urls]
    counter = iter(range(index, 1 << 62, load.procs))

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        start = time.perf_counter()
        ok, chunks = False, 0
        try:
            async with session.post(paths[i % len(paths)], json=body(i, load)) as resp:
                if load.stream:
                    async for line in resp.content:
                        chunks += line.startswith(b"data: {")
                else:
                    await resp.read()
                ok = resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        samples.append((start - t0, time.perf_counter() - start, ok, chunks))

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if load.concurrency:

            async def worker() -> None:
                while time.perf_counter() < stop_at:
                    await one(session, next(counter))

            await asyncio.gather(*(worker() for _ in range(load.concurrency)))
        else:
            await open_loop(load.rate, t0, stop_at, partial(one, session))
    return samples


def _load_main(load: Load, index: int, out: Any) -> None:
    import uvloop

    out.send(uvloop.run(_drive(load, index)))


def run_load(
    load: Load,
    router_pid: int | None,
    rss_every: float = 0.0,
    tick: Callable[[float], None] = lambda _s: None,
) -> dict[str, Any]:
    """Run ``load`` in processes of its own (:meth:`Load.shares`); summarize the window after the
    warm-up; then ``tick`` the seconds it was planned to take (the benchmark's progress)."""
    ctx = mp.get_context("spawn")
    shares = load.shares()
    pipes = [ctx.Pipe(duplex=False) for _ in shares]
    procs = [
        ctx.Process(target=_load_main, args=(share, i, child))
        for i, (share, (_, child)) in enumerate(zip(shares, pipes, strict=True))
    ]
    load_avg = os.getloadavg()[0]
    for proc in procs:
        proc.start()
    rss: list[tuple[float, float]] = []
    try:
        time.sleep(load.warmup)
        pids = [proc.pid for proc in procs if proc.pid is not None]
        t0 = time.monotonic()
        cpu_r = tree_cpu_seconds(router_pid) if router_pid else 0.0
        cpu_l = sum(cpu_seconds(pid) for pid in pids)
        while (elapsed := time.monotonic() - t0) < load.seconds:
            if router_pid and rss_every:
                rss.append((round(elapsed, 1), tree_memory_mb(router_pid)))
            time.sleep(min(rss_every or load.seconds, max(0.01, load.seconds - elapsed)))
        wall = time.monotonic() - t0
        router_cpu = (tree_cpu_seconds(router_pid) - cpu_r) / wall if router_pid else 0.0
        load_cpu = (sum(cpu_seconds(pid) for pid in pids) - cpu_l) / wall
        if router_pid and rss_every:
            rss.append((round(wall, 1), tree_memory_mb(router_pid)))
        per_proc: list[list[tuple[float, float, bool, int]]] = [parent.recv() for parent, _ in pipes]
        for proc in procs:
            proc.join(30)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    tick(load.warmup + load.seconds)
    samples = [s for part in per_proc for s in part]
    row = summarize(samples, load, router_cpu, load_cpu, load_avg, rss)
    return {
        **row,
        "load_procs": len(procs),
        "requests_per_proc": [_in_window(part, load) for part in per_proc],
    }


def _window(
    samples: list[tuple[float, float, bool, int]], load: Load
) -> list[tuple[float, float, bool, int]]:
    """The requests started inside the measured window (after the warm-up)."""
    lo, hi = load.warmup, load.warmup + load.seconds
    return [s for s in samples if lo <= s[0] < hi]


def _in_window(samples: list[tuple[float, float, bool, int]], load: Load) -> int:
    """Good requests started inside the measured window."""
    return sum(1 for s in _window(samples, load) if s[2])


def summarize(
    samples: list[tuple[float, float, bool, int]],
    load: Load,
    router_cpu: float,
    load_cpu: float,
    load_avg: float,
    rss: list[tuple[float, float]],
) -> dict[str, Any]:
    """Requests started inside the measured window (after the warm-up) make the result."""
    window = _window(samples, load)
    good = [s for s in window if s[2]]
    lat = [s[1] * 1000 for s in good]
    rps = len(good) / load.seconds
    return {
        "requests": len(good),
        "errors": len(window) - len(good),
        "rps": rps,
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "chunks_per_request": sum(s[3] for s in good) / max(1, len(good)),
        "router_cpu": router_cpu,
        "router_cpu_ms_per_request": router_cpu * 1000 / rps if rps else 0.0,
        "load_cpu": load_cpu,
        "load_avg_1m": load_avg,
        "rss_mb": rss,
    }
