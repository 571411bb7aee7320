"""``kvstack bench gpu``: the router in front of real vLLM engines (or simulators), measured end to end.

For each workload and policy it starts a fresh router over the running engines, replays the workload
at real speed, and reads both sides' counters before and after: the clients' TTFT and inter-token
latency, the engines' prefix-cache and LMCache (external) hits, and the router's KV index and its
predicted hit tokens. The prediction is checked against what the engines counted. ``--sims N`` runs
the same traces on N simulators instead (the calibration of the simulator against the GPU).

Each (workload, policy) pair gets its own seed, so a later case never finds an earlier case's
prompts in the engines' caches; a simulator run with the same pair replays the identical trace.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from kvstack.bench import promtext, stats, trace, workloads
from kvstack.bench.driver import DriverConfig, RequestResult, run_workload, wait_for_engines
from kvstack.bench.gpu_plot import plot
from kvstack.bench.gpu_procs import PEER_POLICIES, peer_router_proc, router_proc, sim_procs
from kvstack.bench.progress import BenchProgress
from kvstack.common.procs import ManagedProcess, running, tree_cpu_seconds

Samples = Mapping[promtext.SampleKey, float]

ENGINE_COUNTERS = {
    "prefix_hits": "vllm:prefix_cache_hits_total",
    "prefix_queries": "vllm:prefix_cache_queries_total",
    "external_hits": "vllm:external_prefix_cache_hits_total",
    "external_queries": "vllm:external_prefix_cache_queries_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "generation_tokens": "vllm:generation_tokens_total",
    "requests": "vllm:request_success_total",
}
ROUTER_COUNTERS = {
    "predicted_hit_tokens": "kvstack_router_predicted_hit_tokens_total",
    "routed_prompt_tokens": "kvstack_router_prompt_tokens_total",
    "blocks_stored": "kvstack_router_kv_index_blocks_stored_total",
    "events_applied": "kvstack_router_kv_index_events_applied_total",
    "event_batches": "kvstack_router_kv_event_batches_applied_total",
}
INDEX_GAUGE = "kvstack_router_kv_index_blocks"
AGREEMENT_TOLERANCE = 0.10


# ------------------------------------------------------------------ pure parts


def sized_workload(
    name: str, duration_s: float, load: float, prefill_tokens_per_s: float, seed: int
) -> workloads.Workload:
    """A workload whose sessions arrive over about ``duration_s`` at ``load`` x the cold prefill rate.

    The capacity handed to the builders is solved from their own rate formulas, so the arrival span,
    not the KV capacity, sets the run's length.
    """
    fill = workloads.REGIME_FILL["under"]
    if name == "multi_round_qa":
        rounds, system, user, turn = 5, 1000, 2000, 100 + 100 + 2 * workloads.TEMPLATE_TOKENS
        mean_prompt = system + user + 100 + turn * (rounds - 1) / 2
        rate = workloads.request_rate(load, prefill_tokens_per_s, mean_prompt)
        users = max(2, round(duration_s * rate / rounds))
        capacity = math.ceil((users * (user + rounds * turn) + system) / fill)
        return workloads.multi_round_qa(
            capacity, "under", prefill_tokens_per_s=prefill_tokens_per_s, load=load, seed=seed
        )
    if name == "shared_prefix":
        system, per_group = 4000, 16
        rate = workloads.request_rate(
            load, prefill_tokens_per_s, system + 128 + 2 * workloads.TEMPLATE_TOKENS
        )
        groups = max(2, round(duration_s * rate / per_group))
        return workloads.shared_prefix(
            math.ceil(groups * system / fill),
            "under",
            prefill_tokens_per_s=prefill_tokens_per_s,
            load=load,
            seed=seed,
        )
    raise ValueError(f"unknown workload {name!r}; choose multi_round_qa or shared_prefix")


def case_seed(workload: str, policy: str, trace: str = "") -> int:
    """A seed per (workload, policy, trace): distinct prompts per case, the same trace on any machine."""
    return zlib.crc32(f"{workload}/{policy}{'/' + trace if trace else ''}".encode())


def deltas(before: Sequence[Samples], after: Sequence[Samples], names: Mapping[str, str]) -> dict[str, float]:
    """Each counter's increase, summed over the scraped targets."""
    return {
        key: sum(promtext.delta(b, a, name) for b, a in zip(before, after, strict=True))
        for key, name in names.items()
    }


def ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def agreement(predicted: float, counted: float, tolerance: float = AGREEMENT_TOLERANCE) -> dict[str, Any]:
    """How the router's predicted hit tokens compare with the tokens the engines counted as hits."""
    rel = (predicted - counted) / counted if counted else None
    return {
        "predicted": predicted,
        "counted": counted,
        "relative_error": rel,
        "within_tolerance": rel is not None and abs(rel) <= tolerance,
    }


def summarize_case(
    results: Sequence[RequestResult],
    wall: float,
    engines: Mapping[str, float],
    router: Mapping[str, float],
    index_blocks: tuple[float, float],
) -> dict[str, Any]:
    """One case's row: client-side latencies and throughput, engine hits, the router's index."""
    ok = [r for r in results if r.ok]
    ttft = stats.summarize([r.ttft for r in ok if r.ttft is not None])
    itl = stats.summarize([x for r in ok for x in r.itl])
    counted = engines["prefix_hits"]
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "first_error": next((r.error for r in results if not r.ok), ""),
        "wall_s": wall,
        "ttft_p50": ttft["p50"],
        "ttft_p90": ttft["p90"],
        "ttft_p99": ttft["p99"],
        "itl_p50": itl["p50"],
        "itl_p90": itl["p90"],
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "output_tok_s": sum(r.completion_tokens for r in ok) / wall if wall else 0.0,
        "client_cached_tokens": sum(r.cached_tokens for r in ok),
        "engine": dict(engines),
        "prefix_hit_rate": ratio(counted, engines["prefix_queries"]),
        "external_hit_rate": ratio(engines["external_hits"], engines["external_queries"]),
        "router": dict(router),
        "index_blocks_before": index_blocks[0],
        "index_blocks_after": index_blocks[1],
        "prediction_vs_prefix_hits": agreement(router["predicted_hit_tokens"], counted),
        "prediction_vs_all_hits": agreement(
            router["predicted_hit_tokens"], counted + engines["external_hits"]
        ),
    }


def _num_gpu_blocks(samples: Samples) -> int | None:
    for (name, labels), _ in samples.items():
        if name == "vllm:cache_config_info":
            value = dict(labels).get("num_gpu_blocks")
            if value and value.isdigit():
                return int(value)
    return None


def run_case(
    urls: Sequence[str],
    engines_file: Path,
    workload: workloads.Workload,
    load: float,
    model: str,
    policy: str,
    tokenizer: str,
    log_dir: Path,
    trace_path: Path | None = None,
    on_request: Callable[[], None] = lambda: None,
    tokenizer_path: Path | None = None,
) -> dict[str, Any]:
    """One workload through a fresh router with ``policy``; the engines keep running. With
    ``trace_path``, every request's trace row is written there (JSON lines) and summarized;
    ``on_request`` is called as each request completes."""
    peer = policy in PEER_POLICIES
    if peer:
        router, router_url = peer_router_proc(urls, policy, log_dir)
    else:
        router, router_url = router_proc(
            engines_file, policy, tokenizer, log_dir, trace_path is not None, tokenizer_path
        )
    with running([router], timeout=60):
        if not peer:
            wait_for_engines(router_url, len(urls))
        time.sleep(2.0)  # the KV-event subscriptions (or the peer's health checks) connect
        e0 = [promtext.scrape(f"{u}/metrics") for u in urls]
        r0 = {} if peer else promtext.scrape(f"{router_url}/metrics")
        cpu0 = tree_cpu_seconds(router.pid)
        results, wall = asyncio.run(
            run_workload(
                DriverConfig(router_url, model, request_timeout=300), workload, lambda _r: on_request()
            )
        )
        router_cpu_s = tree_cpu_seconds(router.pid) - cpu0  # before the idle second below
        time.sleep(1.0)  # the last KV events land in the index
        e1 = [promtext.scrape(f"{u}/metrics") for u in urls]
        r1 = {} if peer else promtext.scrape(f"{router_url}/metrics")
    row = summarize_case(
        results,
        wall,
        deltas(e0, e1, ENGINE_COUNTERS),
        deltas([r0], [r1], ROUTER_COUNTERS),
        (promtext.total(r0, INDEX_GAUGE), promtext.total(r1, INDEX_GAUGE)),
    )
    per_engine = [promtext.delta(b, a, ENGINE_COUNTERS["requests"]) for b, a in zip(e0, e1, strict=True)]
    if trace_path is not None:
        with router.log_path.open(errors="replace") as f:
            rows = trace.trace_rows(results, trace.router_lines(f))
        trace.write_jsonl(trace_path, rows)
        row["trace"] = {"file": trace_path.name, **trace.summarize(rows)}
    return {
        "workload": workload.name,
        "policy": policy,
        "tokenizer": tokenizer,
        "load": load,
        "sessions": len(workload.sessions),
        "planned_requests": workload.num_requests,
        "request_rate": workload.notes.get("request_rate"),
        "requests_per_engine": per_engine,
        "num_gpu_blocks": _num_gpu_blocks(e1[0]),
        # the router's own CPU (its process tree) over the run, and per request it answered
        "router_cpu_s": router_cpu_s,
        "router_cpu_ms_per_request": 1000 * router_cpu_s / max(1, len(results)),
        **row,
    }


# ------------------------------------------------------------------ the command


def gpu_proof(
    engines_file: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="Running engines (static discovery YAML); omit with --sims."
        ),
    ] = None,
    sims: Annotated[int, typer.Option(help="Start this many simulators instead (calibration).")] = 0,
    sim_blocks: Annotated[
        int, typer.Option(help="KV blocks per simulator (0: the simulator's default or --sim-config's).")
    ] = 0,
    sim_config: Annotated[
        Path | None,
        typer.Option(
            help="`kvstack engine sim --config` YAML for every simulator (e.g. the shared-GPU calibration "
            "bench-results/gpu/sim-h200-shared.yaml); the flags above win over it."
        ),
    ] = None,
    sim_redis: Annotated[
        str | None,
        typer.Option(
            help="redis://HOST:PORT: the simulators run the LMCache connector (CPU tier, KV events) "
            "sharing this Redis, as the GPU run's engines did. Flush it between runs."
        ),
    ] = None,
    model: Annotated[str, typer.Option(help="Served model name.")] = "kvstack/sim-8b",
    policy: Annotated[
        list[str] | None,
        typer.Option(
            help="Policies to compare (repeat): the router's, or sglang_cache_aware / sglang_round_robin "
            "for the SGLang router as the baseline (pip install sglang-router)."
        ),
    ] = None,
    workload: Annotated[list[str] | None, typer.Option(help="multi_round_qa and/or shared_prefix.")] = None,
    duration_s: Annotated[float, typer.Option(help="Arrival span of each case's sessions.")] = 60.0,
    load: Annotated[float, typer.Option(help="Offered prompt tokens / the cold prefill rate.")] = 0.5,
    prefill_tokens_per_s: Annotated[float, typer.Option(help="The cluster's cold prefill rate.")] = 34_000.0,
    tokenizer: Annotated[
        str, typer.Option(help="Router tokenizer: builtin, engine, or local (the model's files).")
    ] = "engine",
    tokenizer_path: Annotated[
        Path | None,
        typer.Option(help="The model's tokenizer files for --tokenizer local (a folder)."),
    ] = None,
    label: Annotated[str, typer.Option(help="Result file name (LABEL.json).")] = "h200",
    trace: Annotated[str, typer.Option(help="Seed salt: a new trace that no earlier run cached.")] = "",
    trace_as: Annotated[
        str | None,
        typer.Option(
            help="Draw every case's trace as this policy's (routers compared on one trace; only on "
            "fresh engines and a flushed Redis, or a later case finds an earlier one's prompts cached)."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Results folder.")] = Path("bench-results/gpu"),
    traced: Annotated[
        bool,
        typer.Option(
            "--trace-requests/--no-trace-requests",
            help="Write every request's trace (LABEL-WORKLOAD-POLICY.trace.jsonl, kvstack.bench.trace).",
        ),
    ] = True,
) -> None:
    """The router over real engines (or simulators): TTFT, ITL, hits, and the KV index's predictions."""
    policies = policy or ["cache_aware", "round_robin"]
    names = workload or ["multi_round_qa", "shared_prefix"]
    log_dir = Path(tempfile.mkdtemp(prefix="kvstack-gpu-"))
    out.mkdir(parents=True, exist_ok=True)
    procs: list[ManagedProcess] = []
    if sims:
        procs, entries = sim_procs(sims, model, sim_blocks or None, log_dir, sim_config, sim_redis)
        engines_file = log_dir / "engines.yaml"
        engines_file.write_text(yaml.safe_dump(entries))
    elif engines_file is None:
        raise typer.BadParameter("give --engines-file or --sims")
    else:
        entries = yaml.safe_load(engines_file.read_text())
    urls = [e["url"] if isinstance(e, dict) else str(e) for e in entries]
    rows: list[dict[str, Any]] = []
    cases = [
        (
            name,
            pol,
            sized_workload(
                name, duration_s, load, prefill_tokens_per_s, seed=case_seed(name, trace_as or pol, trace)
            ),
        )
        for name in names
        for pol in policies
    ]
    total = sum(wl.num_requests for _, _, wl in cases)
    with running(procs, timeout=60), BenchProgress("bench gpu", total, "requests") as bar:
        for name, pol, wl in cases:
            bar.log(f"[{label}] {name} / {pol}: {wl.num_requests} requests ...")
            trace_path = out / f"{label}-{name}-{pol}.trace.jsonl" if traced else None
            row = run_case(
                urls,
                engines_file,
                wl,
                load,
                model,
                pol,
                tokenizer,
                log_dir,
                trace_path,
                bar.advance,
                tokenizer_path,
            )
            rows.append(row)
            bar.log(
                f"  ttft p50 {row['ttft_p50'] * 1000:.1f} ms p90 {row['ttft_p90'] * 1000:.1f} ms, "
                f"itl p50 {row['itl_p50'] * 1000:.2f} ms, errors {row['errors']}, "
                f"prefix hits {row['engine']['prefix_hits']:.0f}, "
                f"router cpu {row['router_cpu_ms_per_request']:.2f} ms/req, "
                f"predicted {row['router']['predicted_hit_tokens']:.0f}, "
                f"index {row['index_blocks_before']:.0f}->{row['index_blocks_after']:.0f}"
            )
            meta = _meta(sim_config if sims else None)
            if sims:
                meta["sim_redis"] = sim_redis is not None
            (out / f"{label}.json").write_text(json.dumps(_document(label, rows, meta), indent=2))
    typer.echo(f"wrote {out / (label + '.json')} and {plot(out)} (logs in {log_dir})")


def _meta(sim_config: Path | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "python": sys.version.split()[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg": list(os.getloadavg()),  # simulators pace themselves on a shared CPU
    }
    if sim_config is not None:  # the settings themselves: the file may change after the run
        meta["sim_config"] = yaml.safe_load(sim_config.read_text())
    return meta


def _document(label: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    return {"label": label, "meta": meta, "cases": rows}
