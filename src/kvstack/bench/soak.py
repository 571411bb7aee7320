"""``kvstack bench soak``: hours-long behaviour in minutes: errors, router RSS and added latency.

Simulators (nearly free at a high speed factor) sit behind one router process. A separate load
process (aiohttp on uvloop) sends an open-loop mix at ``--rate``: half streaming, half not; half
repeated prompts, half unique ones (so every bounded cache in the router fills and must stay
bounded). A small share of requests goes straight to the engines: the same minute's direct
latency, subtracted from the routed one, is the router's added latency. Each minute records the
router's RSS, p50/p99 (routed, direct, added), errors and the load average; the verdict asks for
zero errors, RSS growth under 10 % after the warm-up, and a stable added p99.

``--workload chat`` sends real-size chats instead (3-5K tokens, histories that grow a turn per
request, many users: :mod:`.soak_chats`), and ``--tokenizer engine`` makes the router ask the
simulators' ``/tokenize`` for every new prompt, as it asks real vLLM engines: the path on which the
router's memory once climbed (router/README.md, "Memory over time").
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from kvstack.bench.pacing import open_loop
from kvstack.bench.progress import BenchProgress
from kvstack.bench.report import print_table, write_json
from kvstack.bench.soak_chats import ChatWorkload, chat_body
from kvstack.bench.soak_plot import plot
from kvstack.bench.stats import percentile
from kvstack.common.procs import memory_mb
from kvstack.engine.sim.cli import kv_events_flags

MODEL = "sim"
RSS_GROWTH_LIMIT = 0.10
# the added p99 of any minute may be at most this many times the median minute's (and 5 ms over)
P99_STABILITY = 2.0
P99_SLACK_MS = 5.0
_SYSTEM = "You answer questions from platform teams that run LLM inference on Kubernetes. " * 3

# (start s, latency ms, ok, routed, streamed, error); the error is "" when ok
Sample = tuple[float, float, bool, bool, bool, str]


@dataclass(frozen=True, slots=True)
class SoakLoad:
    router_url: str
    engine_urls: tuple[str, ...]
    seconds: float
    rate: float
    direct_every: int = 10  # every n-th request goes to an engine directly (the baseline)
    max_tokens: int = 16
    chats: ChatWorkload | None = None  # real-size growing chats; None: the short mix


def request_plan(i: int, load: SoakLoad) -> tuple[str, dict[str, Any], bool]:
    """(base URL, body, routed) of request ``i``: streaming and unique prompts alternate in pairs
    (with ``load.chats``: streaming alternates, every prompt is its user's next turn)."""
    stream = i % 2 == 0
    routed = i % load.direct_every != load.direct_every - 1
    url = load.router_url if routed else load.engine_urls[i % len(load.engine_urls)]
    if load.chats is not None:
        return url, chat_body(i, load.chats, load.max_tokens, stream), routed
    unique = (i // 2) % 2 == 0
    k = i if unique else i % 64
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": _SYSTEM},
            {"role": "user", "content": f"Question {k}: how do caches, routers and GPUs interact?"},
        ],
        "max_tokens": load.max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    return url, body, routed


# -------------------------------------------------------------------- load process


async def _drive(load: SoakLoad, out: Any) -> None:
    """Open loop for ``load.seconds``; sends batches of samples through ``out`` about once a second."""
    import aiohttp

    batch: list[Sample] = []
    t0 = time.perf_counter()

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        url, body, routed = request_plan(i, load)
        start = time.perf_counter()
        error = ""
        try:
            async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                data = await resp.read()
                if resp.status != 200:
                    error = f"status {resp.status}"
                elif body["stream"] and not data.rstrip().endswith(b"data: [DONE]"):
                    error = "stream without [DONE]"
                elif b'"error"' in data:
                    error = "error event"
        except (aiohttp.ClientError, TimeoutError) as err:
            error = type(err).__name__
        batch.append(
            (start - t0, (time.perf_counter() - start) * 1000, not error, routed, body["stream"], error)
        )

    flushed = t0

    def flush_each_second() -> None:
        nonlocal batch, flushed
        if time.perf_counter() - flushed >= 1.0:
            out.send(batch)
            batch, flushed = [], time.perf_counter()

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await open_loop(load.rate, t0, t0 + load.seconds, partial(one, session), flush_each_second)
    out.send(batch)
    out.send(None)


def _load_main(load: SoakLoad, out: Any) -> None:
    import uvloop

    uvloop.run(_drive(load, out))


# -------------------------------------------------------------------- pure summaries


def minute_rows(
    samples: list[Sample], rss: list[tuple[float, float]], loads: list[tuple[float, float]], minutes: int
) -> list[dict[str, Any]]:
    """One row per minute of the run: requests, errors, latency percentiles, RSS and load average."""
    rows = []
    for m in range(minutes):
        lo, hi = 60.0 * m, 60.0 * (m + 1)
        window = [s for s in samples if lo <= s[0] < hi]
        routed = [s[1] for s in window if s[3] and s[2]]
        direct = [s[1] for s in window if not s[3] and s[2]]
        rss_in = [mb for t, mb in rss if lo <= t < hi]
        load_in = [la for t, la in loads if lo <= t < hi]
        row: dict[str, Any] = {
            "minute": m + 1,
            "requests": len(window),
            "errors": sum(1 for s in window if not s[2]),
            "routed_p50_ms": percentile(routed, 50),
            "routed_p99_ms": percentile(routed, 99),
            "direct_p50_ms": percentile(direct, 50),
            "direct_p99_ms": percentile(direct, 99),
            "rss_mb": rss_in[-1] if rss_in else float("nan"),
            "load_avg_1m": max(load_in) if load_in else float("nan"),
        }
        row["added_p50_ms"] = row["routed_p50_ms"] - row["direct_p50_ms"]
        row["added_p99_ms"] = row["routed_p99_ms"] - row["direct_p99_ms"]
        rows.append(row)
    return rows


def verdict(rows: list[dict[str, Any]], rss_after_warmup: float, errors: dict[str, int]) -> dict[str, Any]:
    """Zero errors, RSS growth under 10 %, and no minute's added p99 far above the typical minute's."""
    added = sorted(r["added_p99_ms"] for r in rows)
    typical = percentile(added, 50)
    worst = added[-1] if added else float("nan")
    rss_end = rows[-1]["rss_mb"] if rows else float("nan")
    growth = (rss_end - rss_after_warmup) / rss_after_warmup if rss_after_warmup else float("nan")
    half = rows[len(rows) // 2 :]
    slope = (half[-1]["rss_mb"] - half[0]["rss_mb"]) / max(1, len(half) - 1) if half else float("nan")
    return {
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "rss_after_warmup_mb": rss_after_warmup,
        "rss_end_mb": rss_end,
        "rss_growth": growth,
        "rss_mb_per_minute_second_half": slope,
        "added_p99_median_ms": typical,
        "added_p99_worst_ms": worst,
        "zero_errors": not errors,
        "rss_growth_ok": growth < RSS_GROWTH_LIMIT,
        "p99_stable": worst <= max(P99_STABILITY * typical, typical + P99_SLACK_MS),
    }


# -------------------------------------------------------------------- processes and plot


def _processes(
    engines: int, speed: float, gpu_blocks: int, logs: Path, tokenizer: str
) -> tuple[list[Any], Any, tuple[str, ...], str]:
    from kvstack.common.procs import ManagedProcess, free_port, kvstack_argv
    from kvstack.router.discovery.static import sim_engine_entry

    procs: list[Any] = []
    entries: list[dict[str, Any]] = []
    for i in range(engines):
        port, pub, replay = free_port(), free_port(), free_port()
        argv = [
            *kvstack_argv(), "engine", "sim", "--port", str(port), "--served-model-name", MODEL,
            "--speed", str(speed), "--max-num-seqs", "1024", "--max-model-len", "8192",
            "--num-gpu-blocks", str(gpu_blocks),
            *kv_events_flags(pub, replay),
        ]  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        procs.append(ManagedProcess(f"soak-sim-{i}", argv, logs, ready_url=f"{url}/health"))
        entries.append(
            sim_engine_entry(f"engine-{i}", http=port, kv_events=pub, kv_replay=replay, models=[MODEL])
        )
    engines_file = logs / "engines.yaml"
    engines_file.parent.mkdir(parents=True, exist_ok=True)
    engines_file.write_text(yaml.safe_dump(entries, sort_keys=False))
    port = free_port()
    argv = [*kvstack_argv(), "router", "--port", str(port), "--engines-file", str(engines_file)]
    argv += ["--policy", "cache_aware", "--log-level", "warning"]
    router = ManagedProcess(
        "soak-router",
        argv,
        logs,
        env={"KVSTACK_ROUTER_ACCESS_LOG": "false", "KVSTACK_ROUTER_TOKENIZER": tokenizer},
        ready_url=f"http://127.0.0.1:{port}/ready",
    )
    return procs, router, tuple(str(e["url"]) for e in entries), f"http://127.0.0.1:{port}"


# the router's bounded structures: growth past their caps would be a leak, growth up to them is not
GAUGES = ("kvstack_router_kv_index_blocks", "kvstack_router_kv_index_capacity_blocks")


def gauges(metrics_text: str) -> dict[str, float]:
    """The sum over labels of each of ``GAUGES`` in a Prometheus text exposition."""
    out = dict.fromkeys(GAUGES, 0.0)
    for line in metrics_text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def _scrape(url: str) -> dict[str, float]:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
            return gauges(resp.read().decode())
    except OSError:
        return {}


def _run(
    load: SoakLoad, router_pid: int
) -> tuple[list[Sample], list[tuple[float, float]], list[Any], list[tuple[float, dict[str, float]]]]:
    """Run the load process; sample the router's RSS, gauges and the load average every 10 s."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_load_main, args=(load, child))
    samples: list[Sample] = []
    rss: list[tuple[float, float]] = []
    loads: list[tuple[float, float]] = []
    scraped: list[tuple[float, dict[str, float]]] = []
    t0 = time.monotonic()
    proc.start()
    next_sample = 0.0
    try:
        with BenchProgress("bench soak", load.seconds, "s") as bar:
            while True:
                elapsed = time.monotonic() - t0
                bar.update(elapsed)
                if elapsed >= next_sample:
                    rss.append((elapsed, memory_mb(router_pid)))
                    loads.append((elapsed, os.getloadavg()[0]))
                    scraped.append((elapsed, _scrape(load.router_url)))
                    next_sample += 10.0
                if parent.poll(0.5):
                    batch = parent.recv()
                    if batch is None:
                        break
                    samples.extend(batch)
                elif not proc.is_alive():
                    raise RuntimeError(f"the load process died (exit code {proc.exitcode})")
        rss.append((min(time.monotonic() - t0, load.seconds - 0.01), memory_mb(router_pid)))
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    return samples, rss, loads, scraped


def soak(
    minutes: Annotated[float, typer.Option(help="Length of the run in minutes (the goal: 30).")] = 30.0,
    rate: Annotated[float, typer.Option(help="Open-loop requests per second.")] = 200.0,
    engines: Annotated[int, typer.Option(help="Simulators behind the router.")] = 2,
    speed: Annotated[
        float, typer.Option(help="Simulator speed factor (high: engines nearly free).")
    ] = 1000.0,
    gpu_blocks: Annotated[
        int,
        typer.Option(
            help="KV blocks per simulator: small, so the engines' caches (and the router's index of "
            "them) are full and evicting within the warm-up; RSS growth after it is then no cache filling."
        ),
    ] = 8192,
    warmup_minutes: Annotated[
        float, typer.Option(help="Minutes before the RSS baseline (the router's bounded caches fill).")
    ] = 5.0,
    workload: Annotated[
        str,
        typer.Option(
            help="short: the two-message mix; chat: real-size chats (3-5K tokens) whose histories "
            "grow a turn per request, many users."
        ),
    ] = "short",
    tokenizer: Annotated[
        str,
        typer.Option(help="The router's tokenizer: builtin, or engine (asks the simulators' /tokenize)."),
    ] = "builtin",
    out_dir: Annotated[Path, typer.Option("--out", help="Where JSON and PNG go.")] = Path(
        "bench-results/soak"
    ),
) -> None:
    """Soak the router: zero errors, RSS growth under 10 %, stable added p99, minute by minute."""
    from kvstack.common.procs import running

    if minutes <= warmup_minutes:
        raise typer.BadParameter("must be longer than --warmup-minutes", param_hint="--minutes")
    if rate <= 0:
        raise typer.BadParameter("must be positive", param_hint="--rate")
    if workload not in ("short", "chat"):
        raise typer.BadParameter("must be short or chat", param_hint="--workload")
    if tokenizer not in ("builtin", "engine"):
        raise typer.BadParameter("must be builtin or engine", param_hint="--tokenizer")
    chats = ChatWorkload() if workload == "chat" else None
    label = f"{minutes:g}min" + ("" if chats is None else f"-chat-{tokenizer}")
    logs = out_dir / "logs"
    sims, router, engine_urls, router_url = _processes(engines, speed, gpu_blocks, logs, tokenizer)
    load_start = os.getloadavg()
    with running([*sims, router]):
        time.sleep(2.0)  # engines discovered and scraped, KV-event feeds connected
        load = SoakLoad(router_url, engine_urls, minutes * 60, rate, chats=chats)
        samples, rss, loads, scraped = _run(load, router.pid)
        router_alive = router.alive()
    rows = minute_rows(samples, rss, loads, int(minutes + 0.999))
    warm = [mb for t, mb in rss if t >= warmup_minutes * 60]
    errors: dict[str, int] = {}
    for s in samples:
        if not s[2]:
            errors[s[5]] = errors.get(s[5], 0) + 1
    # the warm-up minutes (caches filling, connections opening) count for errors only
    steady = rows[int(warmup_minutes) :] or rows
    result = verdict(steady, warm[0] if warm else float("nan"), errors)
    result["router_alive_at_end"] = router_alive
    payload = {
        "benchmark": "soak",
        "run": label if minutes >= 30 else f"short check: {label} (the goal run is 30 min)",
        "params": {"minutes": minutes, "rate": rate, "engines": engines, "speed": speed,
                   "gpu_blocks": gpu_blocks, "warmup_minutes": warmup_minutes,
                   "direct_every": load.direct_every,
                   "tokenizer": tokenizer,
                   "mix": "1/2 streaming, 1/2 unique prompts, 16 tokens" if chats is None else
                   f"1/2 streaming, growing chats of {chats.prompt_tokens(0)}-"
                   f"{chats.prompt_tokens(chats.turns - 1)} tokens, {chats.users} users, 16 tokens"},
        "machine": {"cpu_count": os.cpu_count(), "loadavg_start": list(load_start),
                    "loadavg_end": list(os.getloadavg())},
        "requests": len(samples),
        "verdict": result,
        "minutes": rows,
        "rss_samples": rss,
        "router_gauges": scraped,
    }  # fmt: skip
    write_json(out_dir / f"soak-{label}.json", payload)
    plot(
        out_dir / f"soak-{label}.png",
        rows,
        f"kvstack router soak, {label} at {rate:g} req/s ({payload['run']})",
    )
    cols = ["minute", "requests", "errors", "routed_p50_ms", "routed_p99_ms", "added_p50_ms", "added_p99_ms"]
    print_table(f"kvstack bench soak: {label} at {rate:g} req/s", rows, [*cols, "rss_mb", "load_avg_1m"])
    typer.echo(f"verdict: {result}")
    typer.echo(f"wrote {out_dir}/soak-{label}.json + .png")
    if not (result["zero_errors"] and result["rss_growth_ok"] and result["p99_stable"]):
        raise typer.Exit(1)
