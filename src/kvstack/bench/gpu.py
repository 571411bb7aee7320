"""``kvstack bench gpu``: the router in front of real vLLM engines (or simulators), measured end to end.

For each case of the plan (``gpu_plan``: engines x workloads x loads x runs x policies) it starts a
fresh router over the running engines, replays the case's workload at real speed, and reads both
sides' counters before and after: the clients' TTFT and inter-token latency, the engines'
prefix-cache and LMCache (external) hits, and the router's KV index and its predicted hit tokens
(``gpu_summary``). ``--sims N`` runs the same traces on N simulators instead (the calibration of
the simulator against the GPU). A matrix resets the caches before every case (``gpu_reset``) and
ends with issue #23's goals per (engines, workload, load) (``gpu_verdict``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from kvstack.bench import promtext, trace, workloads
from kvstack.bench.driver import DriverConfig, run_workload, wait_for_engines, wait_for_events_settled
from kvstack.bench.gpu_plan import (
    WORKLOADS,
    Case,
    PlanError,
    PlanSpec,
    estimate_s,
    plan,
    salted,
    sized_workload,
)
from kvstack.bench.gpu_plot import plot, plot_matrix
from kvstack.bench.gpu_procs import PEER_POLICIES, peer_router_proc, router_proc, sim_procs
from kvstack.bench.gpu_reset import FreshCacheOption, LMCacheApiOption, ResetError, check_lmcache_api
from kvstack.bench.gpu_reset import fresh_cache as fresh_cache_of
from kvstack.bench.gpu_summary import (
    ENGINE_COUNTERS,
    INDEX_GAUGE,
    ROUTER_COUNTERS,
    deltas,
    num_gpu_blocks,
    summarize_case,
)
from kvstack.bench.gpu_verdict import Verdict, table, verdicts
from kvstack.bench.progress import BenchProgress
from kvstack.bench.tokenizer_choice import check_tokenizer
from kvstack.common.procs import ManagedProcess, running, tree_cpu_seconds


def run_case(
    case: Case,
    urls: Sequence[str],
    engines_file: Path,
    workload: workloads.Workload,
    opts: CaseOptions,
    trace_path: Path | None = None,
    on_request: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """One workload through a fresh router with ``case.policy`` over ``urls`` (the engines in
    ``engines_file``); the engines keep running. With ``trace_path``, every request's trace row is
    written there (JSON lines) and summarized; ``on_request`` is called as each request completes."""
    peer = case.policy in PEER_POLICIES
    if peer:
        router, router_url = peer_router_proc(urls, case.policy, opts.log_dir)
    else:
        router, router_url = router_proc(
            engines_file,
            case.policy,
            opts.tokenizer,
            opts.log_dir,
            trace_path is not None,
            opts.tokenizer_path,
            opts.shared_store,
        )
    with running([router], timeout=60):
        if not peer:
            wait_for_engines(router_url, len(urls))
        time.sleep(2.0)  # the KV-event subscriptions (or the peer's health checks) connect
        replayed = 0.0 if peer else wait_for_events_settled(router_url)
        startup_cpu_s = tree_cpu_seconds(router.pid)  # start, tokenizer, the engines' event history
        e0 = [promtext.scrape(f"{u}/metrics") for u in urls]
        r0 = {} if peer else promtext.scrape(f"{router_url}/metrics")
        cpu0 = tree_cpu_seconds(router.pid)
        results, wall = asyncio.run(
            run_workload(
                DriverConfig(router_url, opts.model, request_timeout=300), workload, lambda _r: on_request()
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
        **case.labels(),
        "tokenizer": opts.tokenizer,
        "sessions": len(workload.sessions),
        "planned_requests": workload.num_requests,
        "request_rate": workload.notes.get("request_rate"),
        "requests_per_engine": per_engine,
        "num_gpu_blocks": num_gpu_blocks(e1[0]),
        # the router's own CPU (its process tree) over the run, and per request it answered
        "router_cpu_s": router_cpu_s,
        "router_cpu_ms_per_request": 1000 * router_cpu_s / max(1, len(results)),
        "router_startup_cpu_s": startup_cpu_s,
        "router_replayed_batches": replayed,
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
            "sharing this Redis, as the GPU run's engines did."
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
    load: Annotated[
        list[float] | None,
        typer.Option(help="Offered prompt tokens / the cold prefill rate (repeat for several; default 0.5)."),
    ] = None,
    runs: Annotated[int, typer.Option(help="Runs of every case, each on its own trace salt.")] = 1,
    engines_subset: Annotated[
        list[int] | None,
        typer.Option(
            help="Run on the first K engines of the engines file (repeat: --engines-subset 2 "
            "--engines-subset 4 serves both from one start of four). Default: all, once."
        ),
    ] = None,
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
        typer.Option(help="Draw every case's trace as this policy's (routers compared on one trace)."),
    ] = None,
    same_trace: Annotated[
        bool | None,
        typer.Option(
            "--same-trace/--own-trace",
            help="Every policy of one (engines, workload, load, run) on one trace, its system prompts "
            "prefixed with the policy's own salt (LMCache's CPU tier survives the reset: no router may "
            "load another's prompts). Default: on for a matrix (several loads, runs or engine "
            "subsets), off for a single case.",
        ),
    ] = None,
    fresh_cache: FreshCacheOption = None,
    redis_url: Annotated[
        str | None,
        typer.Option(help="LMCache's shared Redis, flushed before every case (default: --sim-redis)."),
    ] = None,
    lmcache_api: LMCacheApiOption = None,
    sim_tier_events: Annotated[
        bool,
        typer.Option(
            help="With --sim-redis: the simulators send KV events of their LMCache CPU tier (off: GPU "
            "events only, as real vLLM 0.24 + LMCache 0.5.3 engines sent on the H200)."
        ),
    ] = True,
    shared_device: Annotated[
        bool,
        typer.Option(
            help="With --sims: simulators sharing one GPU (a shared_gpu table in --sim-config) name "
            "one device for the router, as real engines on one GPU do; off: the router is not told."
        ),
    ] = True,
    price_redis_loads: Annotated[
        bool,
        typer.Option(
            help="With a shared Redis: the router counts what engines' GPUs store as in it, so a "
            "session sent to another engine is priced as LMCache's load from there "
            "(cache_aware.index.shared_store_from_gpu)."
        ),
    ] = True,
    baseline: Annotated[
        str, typer.Option(help="The policy kvstack's cache_aware is judged against.")
    ] = "sglang_cache_aware",
    dry_run: Annotated[
        bool, typer.Option(help="Print the plan and its estimated wall time; run nothing.")
    ] = False,
    budget_s: Annotated[
        float, typer.Option(help="Refuse a plan estimated to take longer than this (0: no limit).")
    ] = 0.0,
    out: Annotated[Path, typer.Option(help="Results folder.")] = Path("bench-results/gpu"),
    traced: Annotated[
        bool,
        typer.Option(
            "--trace-requests/--no-trace-requests",
            help="Write every request's trace (LABEL-TAG.trace.jsonl, kvstack.bench.trace).",
        ),
    ] = True,
) -> None:
    """The router over real engines (or simulators): TTFT, ITL, hits, and the KV index's predictions."""
    check_tokenizer(tokenizer, tokenizer_path, simulated=bool(sims))
    entries = _engine_entries(engines_file, sims)
    spec = PlanSpec(
        engines_available=len(entries),
        workloads=tuple(workload or WORKLOADS),
        loads=tuple(load or [0.5]),
        policies=tuple(policy or ["cache_aware", "round_robin"]),
        runs=runs,
        engine_counts=tuple(engines_subset or ()),
        trace=trace,
        trace_as=trace_as,
        same_trace=same_trace,
    )
    try:
        cases = plan(spec)
    except PlanError as err:
        raise typer.BadParameter(str(err)) from None
    estimate = estimate_s(cases, duration_s)
    typer.echo(f"plan: {len(cases)} cases, estimated {estimate / 60:.1f} min ({estimate:.0f} s)")
    if dry_run:
        for c in cases:
            text = f", prompts start {c.text_salt}" if c.text_salt else ""
            typer.echo(f"  {c.tag}: seed {c.seed} (trace {c.trace_policy}/{c.salt or '-'}{text})")
        return
    if budget_s and estimate > budget_s:
        raise typer.BadParameter(
            f"the plan is estimated at {estimate:.0f} s, over --budget-s {budget_s:.0f}: shorten "
            "--duration-s, or drop loads, runs, policies or engine subsets"
        )
    reset = spec.is_matrix if fresh_cache is None else fresh_cache
    check_lmcache_api(lmcache_api, cases_reset=reset)
    flush_url = redis_url or sim_redis
    log_dir = Path(tempfile.mkdtemp(prefix="kvstack-gpu-"))
    out.mkdir(parents=True, exist_ok=True)
    procs: list[ManagedProcess] = []
    if sims:
        procs, entries = sim_procs(
            sims,
            model,
            sim_blocks or None,
            log_dir,
            sim_config,
            sim_redis,
            tier_events=sim_tier_events,
            tell_device=shared_device,
        )
    urls = [e["url"] if isinstance(e, dict) else str(e) for e in entries]
    shared_store = price_redis_loads and flush_url is not None
    opts = CaseOptions(model, tokenizer, tokenizer_path, log_dir, shared_store=shared_store)
    traces = [
        salted(sized_workload(c.workload, duration_s, c.load, prefill_tokens_per_s, seed=c.seed), c.text_salt)
        for c in cases
    ]
    rows: list[dict[str, Any]] = []
    found: list[Verdict] = []
    meta = _meta(sim_config if sims else None)
    meta.update(plan=dataclasses.asdict(spec), fresh_cache=reset, estimate_s=estimate)
    meta["lmcache_cpu_cleared"] = bool(lmcache_api)  # only with reset cases (check_lmcache_api)
    if sims:
        meta["sim_redis"] = sim_redis is not None
        meta["shared_device"] = shared_device
    total = sum(wl.num_requests for wl in traces)
    with running(procs, timeout=60), BenchProgress("bench gpu", total, "requests") as bar:
        for case, wl in zip(cases, traces, strict=True):
            if reset:
                try:
                    fresh_cache_of(urls, flush_url, lmcache_api or ())
                except ResetError as err:  # before any request of the case: the results so far stand
                    typer.echo(f"cannot start {case.tag} on a fresh cache: {err}", err=True)
                    raise typer.Exit(1) from None
            subset = entries[: case.engines]
            subset_file = log_dir / f"engines-{case.engines}.yaml"
            subset_file.write_text(yaml.safe_dump(subset))
            bar.log(f"[{label}] {case.tag}: {wl.num_requests} requests ...")
            trace_path = out / f"{label}-{case.tag}.trace.jsonl" if traced else None
            row = run_case(case, urls[: case.engines], subset_file, wl, opts, trace_path, bar.advance)
            rows.append(row)
            bar.log(
                f"  ttft p50 {row['ttft_p50'] * 1000:.1f} ms p90 {row['ttft_p90'] * 1000:.1f} ms, "
                f"itl p50 {row['itl_p50'] * 1000:.2f} ms, errors {row['errors']}, "
                f"prefix hits {row['engine']['prefix_hits']:.0f}, "
                f"router cpu {row['router_cpu_ms_per_request']:.2f} ms/req "
                f"(start {row['router_startup_cpu_s']:.2f} s, replay {row['router_replayed_batches']:.0f}), "
                f"predicted {row['router']['predicted_hit_tokens']:.0f}, "
                f"index {row['index_blocks_before']:.0f}->{row['index_blocks_after']:.0f}"
                + (f", sessions moved {row['trace']['moved_turns']}" if "trace" in row else "")
            )
            found = verdicts(rows, baseline=baseline)
            (out / f"{label}.json").write_text(json.dumps(_document(label, rows, meta, found), indent=2))
    for line in table(found, baseline=baseline):
        typer.echo(line)
    png = plot_matrix(out / f"{label}.json", out / f"{label}.png") if spec.is_matrix else plot(out)
    typer.echo(f"wrote {out / (label + '.json')} and {png} (logs in {log_dir})")


@dataclasses.dataclass(frozen=True, slots=True)
class CaseOptions:
    """What every case of one invocation shares."""

    model: str
    tokenizer: str
    tokenizer_path: Path | None
    log_dir: Path
    shared_store: bool = False  # the engines share a Redis through LMCache (--redis-url / --sim-redis)


def _engine_entries(engines_file: Path | None, sims: int) -> list[Any]:
    """The engines file's entries, or placeholders for ``sims`` simulators not started yet."""
    if sims:
        return [{"url": f"sim{i}"} for i in range(sims)]
    if engines_file is None:
        raise typer.BadParameter("give --engines-file or --sims")
    entries = yaml.safe_load(engines_file.read_text())
    if not isinstance(entries, list) or not entries:
        raise typer.BadParameter(f"--engines-file {engines_file}: expected a non-empty list of engines")
    return entries


def _meta(sim_config: Path | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "python": sys.version.split()[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg": list(os.getloadavg()),  # simulators pace themselves on a shared CPU
    }
    if sim_config is not None:  # the settings themselves: the file may change after the run
        meta["sim_config"] = yaml.safe_load(sim_config.read_text())
    return meta


def _document(
    label: str, rows: list[dict[str, Any]], meta: dict[str, Any], found: Sequence[Verdict]
) -> dict[str, Any]:
    return {"label": label, "meta": meta, "cases": rows, "verdict": [v.as_json() for v in found]}
