"""``kvstack bench router``: what one router process costs and sustains, per upstream backend.

Simulators run at a high speed factor (the engine model nearly free) behind one router process. A
separate load process (aiohttp on uvloop, cheaper per request than the router) measures:

* added latency: p50/p99 through the router minus straight to the engines, open loop at ``--rate``;
* the highest sustained rate, closed loop over ``--concurrency`` levels, non-streaming and streaming;
* the router's RSS over an open-loop soak of unique prompts (``--soak-seconds``), which fills every
  bounded cache (prompt tokens, block keys, index, ledger) so growth past them would show;
* the router's CPU per long streamed answer (``--long-stream-tokens``, 100 by default), open loop at
  ``--long-stream-rate``, through a second set of simulators at ``--long-stream-speed`` (3: each
  token reaches the router as its own chunk, as from a GPU; at x1000 a whole answer arrives in a
  few reads, and the per-chunk relay cost would not show).

The SGLang router (PyPI ``sglang-router``, its Rust gateway) runs in front of the same simulators in
the same run as a baseline, for its ``cache_aware`` and ``round_robin`` policies (``--sglang``).

Router, load generator and simulators share this machine's cores, so each phase records the load
average and the CPU each process used (per request: ``router_cpu_ms_per_request``). Results: JSON +
PNG under ``bench-results/router/``.

This module runs the phases; the processes under test are in :mod:`.router_overhead_procs`, the
verdicts and tables in :mod:`.router_overhead_report`, the figure in :mod:`.router_overhead_plot`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from kvstack.bench.progress import BenchProgress
from kvstack.bench.report import print_table, write_json
from kvstack.bench.router_load import Load, run_load
from kvstack.bench.router_overhead_plot import plot_overhead
from kvstack.bench.router_overhead_procs import (
    kvstack_router,
    router_url,
    serving,
    sim_processes,
    write_engines_file,
)
from kvstack.bench.router_overhead_report import GOALS, print_tables, verdict
from kvstack.bench.router_overhead_workers import label, scaling, wait_workers
from kvstack.bench.sglang_router import SGLANG_POLICIES, sglang_router, wait_sglang_workers


def measure_backend(
    backend: str,
    policy: str,
    engines_file: Path,
    cfg: dict[str, Any],
    logs: Path,
    profile: Path | None,
    tick: Callable[[float], None] = lambda _s: None,
    workers: int = 1,
) -> dict[str, Any]:
    router = kvstack_router(backend, policy, engines_file, logs, profile, workers=workers)
    ready = partial(wait_workers, workers=workers)
    row = measure_router(label(backend, workers), router, cfg, profile, ready=ready, tick=tick)
    return {**row, "workers": workers}


def measure_router(
    label: str,
    router: Any,
    cfg: dict[str, Any],
    profile: Path | None = None,
    ready: Callable[[Any], None] | None = None,
    tick: Callable[[float], None] = lambda _s: None,
) -> dict[str, Any]:
    """Every phase through ``router`` (a kvstack router or a baseline), as row ``label``; ``ready``
    waits for what the router's ready URL does not cover."""
    seconds, warmup, procs = cfg["seconds"], cfg["warmup"], cfg["load_procs"]
    out: dict[str, Any] = {"backend": label}
    with serving(router, profile, ready):
        url, pid = (router_url(router),), router.pid
        out["open"] = run_load(Load(url, seconds, warmup, rate=cfg["rate"], procs=procs), pid, tick=tick)
        for stream, key, tokens in ((False, "closed_nonstream", 16), (True, "closed_stream", 32)):
            out[key] = [
                {"concurrency": c, **run_load(Load(url, seconds, warmup, concurrency=c, stream=stream,
                                                   max_tokens=tokens, procs=procs), pid, tick=tick)}
                for c in cfg["concurrency"]
            ]  # fmt: skip
        if cfg["soak_seconds"] > 0:
            soak = Load(url, cfg["soak_seconds"], warmup, rate=cfg["rate"], unique=True, procs=procs)
            out["soak"] = run_load(soak, pid, rss_every=max(1.0, cfg["soak_seconds"] / 60), tick=tick)
    return out


def long_stream_load(urls: tuple[str, ...], cfg: dict[str, Any]) -> Load:
    """The long-stream phase: open loop, ``long_stream_tokens`` streamed per answer."""
    return Load(
        urls,
        cfg["seconds"],
        cfg["warmup"],
        rate=cfg["long_stream_rate"],
        stream=True,
        max_tokens=cfg["long_stream_tokens"],
        procs=cfg["load_procs"],
    )


def measure_long_stream(
    router: Any,
    cfg: dict[str, Any],
    profile: Path | None = None,
    ready: Callable[[Any], None] | None = None,
    tick: Callable[[float], None] = lambda _s: None,
) -> dict[str, Any]:
    """The long-stream phase through ``router`` (in front of the slow simulators)."""
    with serving(router, profile, ready):
        return run_load(long_stream_load((router_url(router),), cfg), router.pid, tick=tick)


def long_streams(
    cfg: dict[str, Any],
    engines: int,
    policy: str,
    backends: list[str],
    baselines: list[str],
    logs: Path,
    profile: Path | None,
    tick: Callable[[float], None],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The long-stream phase straight to a second set of simulators (at ``long_stream_speed``),
    then through each router in front of them: (direct, one result per backend and baseline)."""
    from kvstack.common.procs import running

    sims, entries = sim_processes(engines, cfg["long_stream_speed"], logs, tag="slow-sim")
    engines_file = write_engines_file(logs / "engines-slow.yaml", entries)
    urls = tuple(e["url"] for e in entries)
    with running(sims):
        direct = run_load(long_stream_load(urls, cfg), None, tick=tick)
        rows = []
        for b in backends:
            prof = None if profile is None else profile / f"{b}-long.prof"
            router = kvstack_router(b, policy, engines_file, logs, prof, tag="router-slow")
            rows.append(measure_long_stream(router, cfg, prof, tick=tick))
        wait = partial(wait_sglang_workers, expected=len(urls))
        rows += [
            measure_long_stream(sglang_router(p, urls, logs), cfg, ready=wait, tick=tick) for p in baselines
        ]
    return direct, rows


def planned_seconds(cfg: dict[str, Any], routers: int) -> float:
    """Seconds of load the run is planned to send: three direct phases, then per router the open
    phase, both closed phases at each concurrency and the soak (each with its warm-up); then the
    long-stream phase, direct and per router, when it runs."""
    phase = cfg["warmup"] + cfg["seconds"]
    soak = cfg["warmup"] + cfg["soak_seconds"] if cfg["soak_seconds"] > 0 else 0.0
    per_router = phase * (1 + 2 * len(cfg["concurrency"])) + soak
    long = phase * (1 + routers) if cfg.get("long_stream_tokens", 0) > 0 else 0.0
    return float(3 * phase + routers * per_router + long)


def router_overhead(
    backend: Annotated[
        list[str] | None, typer.Option(help="Upstream backend: aiohttp, httpx; repeat (default both).")
    ] = None,
    policy: Annotated[str, typer.Option(help="Routing policy of the router.")] = "cache_aware",
    engines: Annotated[int, typer.Option(help="Simulators behind the router.")] = 2,
    speed: Annotated[float, typer.Option(help="Simulator speed factor.")] = 1000.0,
    rate: Annotated[float, typer.Option(help="Open-loop rate for added latency and the soak.")] = 200.0,
    concurrency: Annotated[
        list[int] | None, typer.Option(help="Closed-loop concurrency; repeat (default 32, 128).")
    ] = None,
    seconds: Annotated[float, typer.Option(help="Measured window per phase.")] = 10.0,
    warmup: Annotated[float, typer.Option(help="Warm-up before each window.")] = 2.0,
    soak_seconds: Annotated[float, typer.Option(help="RSS soak length (0: skip).")] = 600.0,
    long_stream_tokens: Annotated[
        int, typer.Option(min=0, help="Tokens per answer of the long-stream phase (0: skip it).")
    ] = 100,
    long_stream_rate: Annotated[
        float, typer.Option(min=0.1, help="Open-loop rate of the long-stream phase.")
    ] = 100.0,
    long_stream_speed: Annotated[
        float,
        typer.Option(min=0.01, help="Speed of the long-stream phase's simulators (slow: a chunk per token)."),
    ] = 3.0,
    out_dir: Annotated[Path, typer.Option(help="Where JSON and PNG go.")] = Path("bench-results/router"),
    profile: Annotated[
        Path | None, typer.Option(help="Run the router under cProfile; stats to DIR/<backend>.prof.")
    ] = None,
    workers: Annotated[
        list[int] | None,
        typer.Option(help="Router worker processes; repeat to measure the scaling (default 1)."),
    ] = None,
    load_procs: Annotated[
        int,
        typer.Option(
            min=1,
            help="Load-generator processes per phase, sharing its clients or rate (one tops out near "
            "4,000 requests/s: several router workers need more).",
        ),
    ] = 1,
    sglang: Annotated[
        list[str] | None,
        typer.Option(
            help="SGLang router policies run as baselines; repeat (default cache_aware, round_robin; "
            "'none': skip). Needs the bench extra's sglang-router."
        ),
    ] = None,
) -> None:
    """Router overhead: added latency, highest sustained rate and RSS over a soak, per backend."""
    from kvstack.common.procs import running

    backends = backend or ["aiohttp", "httpx"]
    for b in backends:
        if b not in ("aiohttp", "httpx"):
            raise typer.BadParameter(f"unknown backend {b!r}", param_hint="--backend")
    baselines = [p for p in (sglang or list(SGLANG_POLICIES)) if p != "none"]
    for p in baselines:
        if p not in SGLANG_POLICIES:
            raise typer.BadParameter(f"unknown SGLang policy {p!r}", param_hint="--sglang")
    if baselines and importlib.util.find_spec("sglang_router") is None:
        raise typer.BadParameter(
            "sglang-router is not installed (pip install -e '.[bench]')", param_hint="--sglang"
        )
    counts = workers or [1]
    if any(n < 1 for n in counts):
        raise typer.BadParameter("worker counts start at 1", param_hint="--workers")
    levels = concurrency or [32, 128]
    cfg: dict[str, Any] = {
        "rate": rate,
        "concurrency": levels,
        "seconds": seconds,
        "warmup": warmup,
        "soak_seconds": soak_seconds,
        "long_stream_tokens": long_stream_tokens,
        "long_stream_rate": long_stream_rate,
        "long_stream_speed": long_stream_speed,
        "load_procs": load_procs,
    }
    logs = out_dir / "logs"
    sims, entries = sim_processes(engines, speed, logs)
    engines_file = write_engines_file(logs / "engines.yaml", entries)
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
    routers = len(backends) * len(counts) + len(baselines)
    planned = planned_seconds(cfg, routers)
    with BenchProgress("bench router", planned, "s planned") as bar:
        tick = bar.advance
        with running(sims):
            urls = tuple(e["url"] for e in entries)
            top = max(levels)
            direct = {
                "open": run_load(Load(urls, seconds, warmup, rate=rate, procs=load_procs), None, tick=tick),
                "closed_nonstream": run_load(
                    Load(urls, seconds, warmup, concurrency=top, procs=load_procs), None, tick=tick
                ),
                "closed_stream": run_load(
                    Load(
                        urls, seconds, warmup, concurrency=top, stream=True, max_tokens=32, procs=load_procs
                    ),
                    None,
                    tick=tick,
                ),
            }
            rows = [
                measure_backend(
                    b,
                    policy,
                    engines_file,
                    cfg,
                    logs,
                    None if profile is None else profile / f"{label(b, n)}.prof",
                    tick,
                    workers=n,
                )
                for b in backends
                for n in counts
            ]
            wait = partial(wait_sglang_workers, expected=len(urls))
            rows += [
                measure_router(f"sglang-{p}", sglang_router(p, urls, logs), cfg, ready=wait, tick=tick)
                for p in baselines
            ]
        if long_stream_tokens > 0 and 1 in counts:  # its rows are the one-worker routers
            direct["stream_long"], long = long_streams(
                cfg, engines, policy, backends, baselines, logs, profile, tick
            )
            # the long streams run through one-worker routers: their rows are the one-worker ones
            single = [r for r in rows if r.get("workers", 1) == 1]
            for row, result in zip(single, long, strict=True):
                row["stream_long"] = result
    verdicts = [verdict(direct["open"], r) for r in rows]
    scaled = scaling(verdicts, backends, counts)
    usable_cpus = len(os.sched_getaffinity(0))
    payload = {
        "benchmark": "router_overhead",
        "goals": GOALS,
        "params": {**cfg, "policy": policy, "engines": engines, "speed": speed, "workers": counts},
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus,
        "direct": direct,
        "backends": rows,
        "verdicts": verdicts,
        "scaling": scaled,
    }
    write_json(out_dir / "router_overhead.json", payload)
    plot_overhead(out_dir / "router_overhead.png", direct, rows, verdicts, GOALS, cores=usable_cpus)
    print_tables(direct, rows, verdicts, cfg, policy, engines, speed)
    if len(counts) > 1:
        scols = ["backend", "workers", "rps_nonstream", "speedup_nonstream", "rps_stream", "speedup_stream"]
        scols += ["cpu_ms_per_request", "added_p50_ms"]
        print_table("Scaling over router workers", scaled, scols)
    typer.echo(f"wrote {out_dir}/router_overhead.json + .png")
