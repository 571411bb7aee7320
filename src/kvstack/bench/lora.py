"""The LoRA benchmark (``kvstack bench lora``): many adapters with Zipf popularity over simulated engines.

One trace (seeded): ``adapters`` adapters of one base model, picked with Zipf(``zipf_s``) popularity,
arriving as a Poisson stream. Every prompt is one system prompt all adapters share, then its
adapter's own instructions, then a fresh question; vLLM keeps each adapter's KV apart, so only the
same adapter's earlier requests can be hit. Three ways to route it, each on fresh engines
(``max_loras`` GPU slots each, KV events on, swap cost from ``latency.lora_swap_s``):

* ``cache_aware``: every adapter loaded everywhere; the router scores each engine by the request's
  adapter-scoped cached blocks and its load (adapter affinity follows from the cache);
* ``round_robin``: every adapter loaded everywhere, engines in turn;
* ``name_only``: each adapter loaded on two engines (a static placement), and requests spread over
  the engines that hold it (round robin among them): routing by adapter name alone, as the
  production stacks that know adapters but not the KV cache do.

Measured per case: client TTFT p50/p90, the engines' prefix-cache hit rate, adapter swaps (the
simulators' ``kvstack_sim_lora_swaps_total``), requests deferred by ``max_loras``, goodput
(requests per second whose TTFT met the SLO) and the error rate.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import yaml

from kvstack.bench import promtext, stats
from kvstack.common import tokenizer
from kvstack.common.procs import ManagedProcess, free_ports, kvstack_argv, running
from kvstack.common.waits import wait_until
from kvstack.engine.sim.cli import kv_events_flags
from kvstack.router.discovery.static import sim_engine_entry

MODEL = "kvstack/sim-8b"
MODES = ("cache_aware", "round_robin", "name_only")
OUT = Path("bench-results/lora")
_WORDS = [
    "policy",
    "ledger",
    "refund",
    "carrier",
    "invoice",
    "tariff",
    "audit",
    "quota",
    "clause",
    "warranty",
    "escrow",
    "bond",
]


@dataclass(slots=True)
class LoraSetup:
    engines: int = 4
    adapters: int = 20
    max_loras: int = 4
    zipf_s: float = 1.0
    requests: int = 240
    rate: float = 40.0  # requests per simulated second
    shared_tokens: int = 512  # the system prompt every adapter shares
    adapter_tokens: int = 768  # each adapter's own instructions
    question_tokens: int = 24
    max_tokens: int = 16
    num_gpu_blocks: int = 1024  # 16K tokens per engine: a few adapters' prompts each, not all 20
    block_size: int = 16
    # Simulated seconds per wall second. Below 1 the engines' work stretches in wall time, so a busy
    # host (this machine's 2 shared cores) does not slow the simulators' steps; times reported are
    # simulated (wall x speed), arrivals are sent at wall time at / speed.
    speed: float = 0.25
    slo_ttft_s: float = 0.25  # simulated seconds
    seed: int = 0
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kvstack-bench-lora-")))


@dataclass(frozen=True, slots=True)
class Request:
    at: float  # seconds after the start
    adapter: str
    prompt: str


def adapter_name(i: int) -> str:
    return f"adapter-{i:02d}"


def zipf_weights(n: int, s: float) -> list[float]:
    """Popularity of ranks 1..n under Zipf(s), summing to 1. Pure."""
    raw = [1.0 / (k**s) for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def _text(tokens: int, seed: str) -> str:
    rng = random.Random(seed)
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words))) < tokens:
        words.extend(rng.choice(_WORDS) + str(rng.randrange(100)) for _ in range(16))
    return " ".join(words)


def make_trace(setup: LoraSetup) -> list[Request]:
    """The seeded trace: Poisson arrivals, Zipf adapters, shared + per-adapter + fresh prompt parts."""
    rng = random.Random(setup.seed)
    shared = _text(setup.shared_tokens, "shared")
    own = [_text(setup.adapter_tokens, f"adapter-{i}") for i in range(setup.adapters)]
    weights = zipf_weights(setup.adapters, setup.zipf_s)
    out: list[Request] = []
    t = 0.0
    for n in range(setup.requests):
        t += rng.expovariate(setup.rate)
        i = rng.choices(range(setup.adapters), weights)[0]
        question = _text(setup.question_tokens, f"q-{setup.seed}-{n}")
        out.append(Request(t, adapter_name(i), f"{shared}\n{own[i]}\nQuestion {n}: {question}"))
    return out


def placement(mode: str, adapters: int, engines: int) -> list[list[str]]:
    """Adapters loaded on each engine: all everywhere, or two engines each for ``name_only``. Pure."""
    if mode != "name_only":
        return [[adapter_name(i) for i in range(adapters)] for _ in range(engines)]
    held: list[list[str]] = [[] for _ in range(engines)]
    for i in range(adapters):
        for e in (i % engines, (i + 1) % engines):
            held[e].append(adapter_name(i))
    return held


def _stack(setup: LoraSetup, mode: str) -> tuple[list[ManagedProcess], str, list[str]]:
    ports = free_ports(3 * setup.engines + 1)
    log_dir = setup.log_dir / mode
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[ManagedProcess] = []
    entries: list[dict[str, Any]] = []
    held = placement(mode, setup.adapters, setup.engines)
    for i in range(setup.engines):
        http, pub, replay = ports[3 * i : 3 * i + 3]
        url = f"http://127.0.0.1:{http}"
        modules = [a for name in held[i] for a in ("--lora-modules", f"{name}=/adapters/{name}")]
        argv = kvstack_argv(
            "engine", "sim", "--port", str(http), "--model", MODEL, "--speed", str(setup.speed),
            "--num-gpu-blocks", str(setup.num_gpu_blocks), "--block-size", str(setup.block_size),
            "--max-model-len", "8192", "--enable-lora", "--max-loras", str(setup.max_loras),
            "--max-cpu-loras", str(setup.adapters),
            *kv_events_flags(pub, replay), *modules,
        )  # fmt: skip
        procs.append(ManagedProcess(f"sim{i}", argv, log_dir, ready_url=f"{url}/health"))
        # no models: the router reads each engine's /v1/models (adapters)
        entries.append(sim_engine_entry(f"sim{i}", http=http, kv_events=pub, kv_replay=replay))
    engines_file = log_dir / "engines.yaml"
    engines_file.write_text(yaml.safe_dump(entries))
    router_url = f"http://127.0.0.1:{ports[-1]}"
    policy = "cache_aware" if mode == "cache_aware" else "round_robin"
    argv = kvstack_argv(
        "router", "--port", str(ports[-1]), "--engines-file", str(engines_file), "--policy", policy,
        "--log-level", "warning",
    )  # fmt: skip
    env = {"KVSTACK_ROUTER_ACCESS_LOG": "false", "KVSTACK_ROUTER_EXPOSE_ENGINE_HEADER": "true"}
    procs.append(ManagedProcess("router", argv, log_dir, env=env, ready_url=f"{router_url}/ready"))
    return procs, router_url, [e["url"] for e in entries]


@dataclass(slots=True)
class Result:
    adapter: str
    ok: bool
    status: int = 0
    ttft: float | None = None
    engine: str = ""


async def _one(client: httpx.AsyncClient, url: str, req: Request, max_tokens: int) -> Result:
    body = {"model": req.adapter, "prompt": req.prompt, "max_tokens": max_tokens, "stream": True}
    start = time.perf_counter()
    ttft: float | None = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return Result(req.adapter, False, resp.status_code)
            async for line in resp.aiter_lines():
                if ttft is None and line.startswith("data: {"):
                    ttft = time.perf_counter() - start
            return Result(req.adapter, True, 200, ttft, resp.headers.get("x-kvstack-engine", ""))
    except httpx.HTTPError:
        return Result(req.adapter, False, 0)


async def _replay(
    url: str, trace: Sequence[Request], max_tokens: int, speed: float
) -> tuple[list[Result], float]:
    """Send the trace open loop (simulated arrival times over ``speed``); TTFTs and the wall time
    come back in simulated seconds."""
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=120, limits=limits, trust_env=False) as client:
        start = time.perf_counter()

        async def at(req: Request) -> Result:
            await asyncio.sleep(max(0.0, start + req.at / speed - time.perf_counter()))
            result = await _one(client, url, req, max_tokens)
            if result.ttft is not None:
                result.ttft *= speed
            return result

        results = await asyncio.gather(*(at(r) for r in trace))
        return list(results), (time.perf_counter() - start) * speed


def _adapters_listed(router_url: str, adapters: int) -> bool:
    try:
        ids = {m["id"] for m in httpx.get(f"{router_url}/v1/models", timeout=2).json()["data"]}
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return all(adapter_name(i) in ids for i in range(adapters))


def run_case(setup: LoraSetup, mode: str, trace: Sequence[Request]) -> dict[str, Any]:
    procs, router_url, engine_urls = _stack(setup, mode)
    with running(procs, timeout=60):
        wait_until(
            lambda: _adapters_listed(router_url, setup.adapters), "the router to learn the adapters", 30
        )
        before = [promtext.scrape(f"{u}/metrics") for u in engine_urls]
        results, wall = asyncio.run(_replay(router_url, trace, setup.max_tokens, setup.speed))
        after = [promtext.scrape(f"{u}/metrics") for u in engine_urls]

    def engines_delta(name: str) -> float:
        return sum(promtext.delta(b, a, name) for b, a in zip(before, after, strict=True))

    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    ttft = stats.summarize(ttfts)
    queries = engines_delta("vllm:prefix_cache_queries_total")
    met = sum(1 for t in ttfts if t <= setup.slo_ttft_s)
    spread: dict[str, set[str]] = {}
    for r in ok:
        spread.setdefault(r.adapter, set()).add(r.engine)
    return {
        "mode": mode,
        "requests": len(results),
        "error_rate": (len(results) - len(ok)) / len(results) if results else 0.0,
        "ttft_p50": ttft["p50"],
        "ttft_p90": ttft["p90"],
        "hit_rate": engines_delta("vllm:prefix_cache_hits_total") / queries if queries else 0.0,
        "swaps": engines_delta("kvstack_sim_lora_swaps_total"),
        "goodput_rps": met / wall if wall else 0.0,
        "slo_met": met / len(results) if results else 0.0,
        "engines_per_adapter": sum(len(v) for v in spread.values()) / len(spread) if spread else 0.0,
        "duration_s": wall,  # simulated
    }


def run(
    setup: LoraSetup, modes: Sequence[str] = MODES, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    trace = make_trace(setup)
    rows = []
    for mode in modes:
        progress(f"lora bench: {mode} ({setup.requests} requests at {setup.rate:g}/s)")
        rows.append(run_case(setup, mode, trace))
    setup_dict = {k: getattr(setup, k) for k in setup.__slots__ if k != "log_dir"}
    return {"setup": setup_dict, "rows": rows}


def plot(payload: dict[str, Any], path: Path) -> None:
    """Four panels (TTFT p50/p90, hit rate, swaps, goodput), one bar per routing mode."""
    import matplotlib.pyplot as plt

    from kvstack.bench.report import save_figure

    rows = payload["rows"]
    modes = [r["mode"] for r in rows]
    panels = [
        ("TTFT p50 / p90 (ms)", [("ttft_p50", 1e3), ("ttft_p90", 1e3)]),
        ("prefix-cache hit rate", [("hit_rate", 1.0)]),
        ("adapter swaps (CPU->GPU)", [("swaps", 1.0)]),
        (f"goodput (req/s, TTFT <= {payload['setup']['slo_ttft_s']:g} s)", [("goodput_rps", 1.0)]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (title, keys) in zip(axes, panels, strict=True):
        width = 0.8 / len(keys)
        for j, (key, scale) in enumerate(keys):
            xs = [i + j * width for i in range(len(modes))]
            ax.bar(xs, [r[key] * scale for r in rows], width, label=key)
        ax.set_xticks([i + (len(keys) - 1) * width / 2 for i in range(len(modes))], modes, fontsize=8)
        ax.set_title(title, fontsize=9)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    s = payload["setup"]
    fig.suptitle(
        f"{s['adapters']} LoRA adapters (Zipf {s['zipf_s']:g}) over {s['engines']} simulated engines, "
        f"max_loras {s['max_loras']}",
        fontsize=10,
    )
    save_figure(fig, path)


def write(payload: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lora.json").write_text(json.dumps(payload, indent=1, sort_keys=True))
    plot(payload, out_dir / "lora.png")


def lora_bench(
    out: Annotated[Path, typer.Option(help="Folder for lora.json and lora.png.")] = Path(
        "bench-results/lora"
    ),
    requests: Annotated[int, typer.Option(min=10, help="Requests per routing mode.")] = 240,
    rate: Annotated[float, typer.Option(min=0.1, help="Requests per simulated second.")] = 40.0,
    speed: Annotated[float, typer.Option(min=0.01, help="Simulated seconds per wall second.")] = 0.25,
    adapters: Annotated[int, typer.Option(min=1, help="LoRA adapters (Zipf popularity).")] = 20,
    engines: Annotated[int, typer.Option(min=2, help="Simulated engines.")] = 4,
    max_loras: Annotated[int, typer.Option(min=1, help="GPU adapter slots per engine.")] = 4,
    seed: Annotated[int, typer.Option(help="Trace seed.")] = 0,
) -> None:
    """Adapter-affinity cache-aware routing vs round_robin vs routing by adapter name only."""
    from kvstack.bench.report import print_table

    setup = LoraSetup(
        requests=requests,
        rate=rate,
        speed=speed,
        adapters=adapters,
        engines=engines,
        max_loras=max_loras,
        seed=seed,
    )
    payload = run(setup)
    write(payload, out)
    columns = ["mode", "ttft_p50", "ttft_p90", "hit_rate", "swaps", "goodput_rps", "error_rate"]
    print_table("LoRA routing", payload["rows"], [*columns, "engines_per_adapter"])
    print(f"wrote {out / 'lora.json'} and {out / 'lora.png'}")
