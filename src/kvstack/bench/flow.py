"""``kvstack bench flow``: flow control under overload, against the same traces without it.

Four simulated engines (``--sim-config``: by default four vLLM 0.24 engines sharing one H200, the
GPU run of the flow-control issue) behind a router per policy (:data:`flow_plan.POLICIES`), fed
multi-round QA from :func:`flow_plan.build_trace`. Three scenarios:

1. **ramp**: one tenant at 0.5x .. 2x the cluster's capacity (``--capacity-rps``, measured: the
   completion rate of the cluster under overload): goodput, 429 rate, admitted TTFT per policy;
2. **fairness**: tenant A at 10x tenant B's rate, together above capacity, against B alone;
3. **priority**: an ``interactive`` class beside a ``batch`` flood.

The simulators run at ``--speed`` < 1 (a saturated cluster then takes few requests per wall
second); every time is reported in simulated seconds. Writes ``flow.json`` and ``flow.png``. The
stack a policy runs on is :mod:`.flow_stack`'s, the plan and its arithmetic :mod:`.flow_plan`'s,
the clients :mod:`.flow_driver`'s; this module runs the cases, reads the counters, plots, and is the
command.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, cast, get_args

import typer

from kvstack.bench import flow_gpu_goals, flow_plan, promtext
from kvstack.bench.flow_driver import Client, run_trace
from kvstack.bench.flow_plan import PEER, Policy, Results, Stream
from kvstack.bench.flow_stack import DEFAULT_SIM_CONFIG, MODEL, FlowSetup, flow_available, ready_stack
from kvstack.bench.gpu_procs import PEER_POLICIES
from kvstack.bench.gpu_reset import FreshCacheOption, LMCacheApiOption, check_lmcache_api
from kvstack.bench.gpu_reset import fresh_cache as reset_engines
from kvstack.bench.tokenizer_choice import check_tokenizer
from kvstack.router.flow.config import Ordering


def _case(
    setup: FlowSetup, url: str, streams: Sequence[Stream], seed: int
) -> tuple[list[flow_plan.Outcome], float]:
    trace = flow_plan.build_trace(streams, setup.shape, seed)
    client = Client(url, setup.model, setup.speed, retries=setup.client_retries)
    return asyncio.run(run_trace(client, trace))


def before_case(setup: FlowSetup, engine_urls: Sequence[str]) -> None:
    """Real engines start each case as the first: idle, GPU prefix caches empty, Redis flushed.

    Simulators need nothing: each policy starts its own."""
    if setup.engines_file is not None and setup.fresh_cache:
        reset_engines(engine_urls, setup.redis_url, setup.lmcache_apis)


def scenarios_of(setup: FlowSetup) -> dict[str, list[tuple[str, list[Stream]]]]:
    """Each scenario's cases: (name, the tenants' streams), for ``setup``'s capacity and window."""
    cap, d = setup.capacity_rps, setup.duration_s
    over = 1.5 * cap  # fairness and priority: together above capacity
    fair = flow_plan.fairness_window_s(over / 11, d, setup.shape)  # B: several users
    return {
        "ramp": [(f"{load:g}x", [Stream("A", load * cap, d)]) for load in setup.ramp],
        "fairness": [
            ("B alone", [Stream("B", over / 11, fair)]),
            ("A 10x + B", [Stream("A", over * 10 / 11, fair), Stream("B", over / 11, fair)]),
        ],
        "priority": [
            ("interactive alone", [Stream("A", 0.3 * cap, d, "interactive")]),
            (
                "interactive + batch flood",
                [Stream("A", 0.3 * cap, d, "interactive"), Stream("B", 1.5 * cap, d, "batch")],
            ),
        ],
    }


def run(
    setup: FlowSetup,
    policies: Sequence[Policy],
    scenarios: Sequence[str],
    progress: Callable[[str], None] = print,
    trace: Callable[[dict[str, Any]], object] | None = None,
) -> Results:
    """Every scenario's cases through one stack per policy (cases in turn, each its own trace);
    ``trace`` is given each request's outcome (with its scenario, case and policy)."""
    results = Results()
    plan = scenarios_of(setup)
    for policy in policies:
        if policy.flow and not flow_available():
            progress(f"{policy.name}: this router has no flow control; skipped")
            continue
        with ready_stack(setup, policy) as (procs, url, engine_urls):
            for scenario in scenarios:
                for seed, (case, streams) in enumerate(plan[scenario]):
                    before_case(setup, engine_urls)
                    load0 = os.getloadavg()[0]
                    window = max(s.duration_s for s in streams)
                    log_at = procs[-1].log_path.stat().st_size if procs[-1].log_path.exists() else 0
                    before = [promtext.scrape(f"{u}/metrics") for u in engine_urls]
                    r_before = _router_scrape(url, policy)
                    outcomes, length = _case(
                        setup, url, streams, seed=zlib.crc32(f"{scenario}/{case}".encode())
                    )
                    after = [promtext.scrape(f"{u}/metrics") for u in engine_urls]
                    r_after = _router_scrape(url, policy)
                    row: dict[str, Any] = {
                        "scenario": scenario,
                        "case": case,
                        "policy": policy.name,
                        "offered_rps": round(sum(s.rate for s in streams), 3),
                        "window_s": round(window, 2),
                        **flow_plan.summarize(outcomes, window),
                        "tenants": flow_plan.by_group(outcomes, "tenant", window),
                        "classes": flow_plan.by_group(outcomes, "klass", window),
                        "run_s": round(length, 2),
                        **_engine_counters(before, after),
                        **_flow_counters(r_before, r_after),
                        "loadavg": [round(load0, 2), round(os.getloadavg()[0], 2)],
                    }
                    if setup.decision_log and policy.routing not in PEER_POLICIES:
                        row.update(_narrowed(procs[-1].log_path, log_at, len(engine_urls)))
                    if scenario == "ramp":
                        row["load"] = setup.ramp[seed]
                    getattr(results, scenario).append(row)
                    if trace is not None:
                        for o in outcomes:
                            trace({"scenario": scenario, "case": case, "policy": policy.name, **asdict(o)})
                    progress(
                        f"{policy.name:>16} {scenario:>8} {case:>26}: goodput {row['goodput_rps']:.2f}/s, "
                        f"429 final {row['shed_rate']:.0%}, attempts/req {row['attempts_per_request']}, "
                        f"TTFT p50/p90/p99 first attempt {row['ttft_first_attempt_p50_s']}/"
                        f"{row['ttft_first_attempt_p90_s']}/{row['ttft_first_attempt_p99_s']} s, "
                        f"last {row['ttft_p50_s']}/{row['ttft_p90_s']}/{row['ttft_p99_s']} s, "
                        f"cold turns refused {row['cold_shed']} ({row['users']} users), "
                        f"errors {row['errors']}, "
                        f"narrowed {row.get('narrowed', '-')}/{row.get('decisions', '-')}, "
                        f"loadavg {row['loadavg']}"
                    )
    return results


def _engine_counters(
    before: Sequence[promtext.Samples], after: Sequence[promtext.Samples]
) -> dict[str, float]:
    """The engines' own view of a case: prefix-cache hit rate and preemptions (recomputes)."""

    def d(name: str) -> float:
        return sum(promtext.delta(b, a, name) for b, a in zip(before, after, strict=True))

    queries = d("vllm:prefix_cache_queries_total")
    return {
        "hit_rate": round(d("vllm:prefix_cache_hits_total") / queries, 4) if queries else 0.0,
        "preemptions": d("vllm:num_preemptions_total"),
        "prompt_tokens": d("vllm:prompt_tokens_total"),
    }


def _narrowed(log: Path, offset: int, engines: int) -> dict[str, int]:
    """The decisions the router logged since ``offset`` of its log, and how many were narrowed."""
    with log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return flow_plan.narrowed_decisions(text.splitlines(), engines)


def _router_scrape(url: str, policy: Policy) -> promtext.Samples:
    return {} if policy.routing in PEER_POLICIES else promtext.scrape(f"{url}/metrics")


def _flow_counters(before: promtext.Samples, after: promtext.Samples) -> dict[str, Any]:
    """What flow control did in a case: refusals by reason, and how its TTFT predictions fared."""
    shed: dict[str, float] = {}
    for (name, labels), value in after.items():
        if name == "kvstack_router_flow_shed_total":
            reason = dict(labels).get("reason", "")
            shed[reason] = shed.get(reason, 0.0) + value - before.get((name, labels), 0.0)
    ratio = "kvstack_router_flow_ttft_prediction_ratio"
    if not promtext.delta(before, after, f"{ratio}_count"):
        return {"shed_by_reason": {k: v for k, v in shed.items() if v}}
    return {
        "shed_by_reason": {k: v for k, v in shed.items() if v},
        "ttft_actual_over_predicted_p50": promtext.histogram_quantile(after, ratio, 0.5, before),
        "ttft_actual_over_predicted_p90": promtext.histogram_quantile(after, ratio, 0.9, before),
    }


def plot(results: Results, path: Path, *, simulated: bool = True) -> None:
    """Against offered load, one line per policy: goodput; the completed requests' TTFT as their
    users saw it (from the first attempt) p90 and p99, and the admitted p90 (from the last attempt);
    the share of requests finally refused, and retries per request. ``simulated``: the times are
    the simulators' (else real engines': wall time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(15, 4))
    for i, name in enumerate(sorted({r["policy"] for r in results.ramp})):
        rows = sorted((r for r in results.ramp if r["policy"] == name), key=lambda r: r["load"])
        loads, color = [r["load"] for r in rows], f"C{i}"
        left.plot(loads, [r["goodput_rps"] for r in rows], marker="o", color=color, label=name)
        # rows written before client retries have no first-attempt TTFT: theirs was the only one
        p90 = [r.get("ttft_first_attempt_p90_s", r["ttft_p90_s"]) for r in rows]
        p99 = [r.get("ttft_first_attempt_p99_s", r["ttft_p99_s"]) for r in rows]
        mid.plot(loads, p90, marker="o", color=color, label=f"{name} p90")
        mid.plot(loads, p99, marker="x", linestyle=":", color=color, label=f"{name} p99")
        if any("ttft_first_attempt_p90_s" in r for r in rows):  # retries: the admitted p90 differs
            last = [r["ttft_p90_s"] for r in rows]
            mid.plot(
                loads, last, linestyle="--", linewidth=0.8, color=color, label=f"{name} p90, last attempt"
            )
        right.plot(loads, [r["shed_rate"] for r in rows], marker="o", color=color, label=f"{name} refused")
        attempts = [r.get("attempts_per_request", 1.0) - 1 for r in rows]
        right.plot(loads, attempts, marker="x", linestyle=":", color=color, label=f"{name} retries/request")
    left.set_xlabel("offered load (x capacity)")
    left.set_ylabel("goodput: requests/s with TTFT <= 1 s\n(from the first attempt)")
    mid.set_xlabel("offered load (x capacity)")
    mid.set_ylabel(f"TTFT from the first attempt (s{', simulated' if simulated else ''})")
    mid.set_ylim(bottom=0)
    mid.axhline(flow_plan.OBJECTIVE_S, color="grey", linewidth=0.8)
    right.set_xlabel("offered load (x capacity)")
    right.set_ylabel("share finally refused (429); retries per request")
    for ax, size in ((left, 8), (mid, 7), (right, 7)):
        ax.legend(fontsize=size)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def flow_bench(
    out: Annotated[Path, typer.Option("--out", help="Results folder.")] = Path("bench-results"),
    policy: Annotated[
        list[str] | None, typer.Option(help="Policies (default all): see flow_plan.POLICIES.")
    ] = None,
    scenario: Annotated[
        list[str] | None, typer.Option(help="ramp, fairness, priority (default all).")
    ] = None,
    speed: Annotated[float, typer.Option(min=0.01, help="Simulator speed (simulated s per wall s).")] = 0.5,
    capacity_rps: Annotated[
        float, typer.Option(min=0.1, help="The cluster's capacity, simulated req/s.")
    ] = 16.0,
    duration_s: Annotated[float, typer.Option(min=1, help="Arrival window per case, simulated s.")] = 8.0,
    sim_config: Annotated[Path | None, typer.Option(help="Simulator config (YAML).")] = DEFAULT_SIM_CONFIG,
    label: Annotated[
        str, typer.Option(help="Result names: LABEL.json, LABEL.png, LABEL.trace.jsonl.gz.")
    ] = "flow",
    engines_file: Annotated[
        Path | None, typer.Option(help="Running engines (static discovery YAML) instead of simulators.")
    ] = None,
    model: Annotated[str, typer.Option(help="Served model name.")] = MODEL,
    tokenizer: Annotated[
        str, typer.Option(help="Router tokenizer: builtin, engine, or local (the model's files).")
    ] = "builtin",
    tokenizer_path: Annotated[
        Path | None, typer.Option(help="The model's tokenizer files for --tokenizer local (a folder).")
    ] = None,
    decision_log: Annotated[
        bool,
        typer.Option(help="Router at DEBUG: count the decisions flow control narrowed, per case."),
    ] = False,
    prefill_tokens_per_s: Annotated[
        float, typer.Option(help="An engine's cold prefill rate (tokens/s, simulated time) for the router.")
    ] = 2_100.0,
    prefill_target_s: Annotated[
        float, typer.Option(help="Flow control: prefill work an engine may hold (simulated s).")
    ] = 0.5,
    client_retries: Annotated[
        int,
        typer.Option(
            min=0,
            help="Retries of a refused request, after its Retry-After (as the openai SDK's "
            "max_retries, default 2); 0: a refused turn is given up.",
        ),
    ] = 2,
    fresh_cache: FreshCacheOption = None,
    redis_url: Annotated[
        str | None,
        typer.Option(help="With --engines-file: the engines' shared LMCache Redis, flushed per case."),
    ] = None,
    lmcache_api: LMCacheApiOption = None,
    load: Annotated[
        list[float] | None,
        typer.Option(help="The ramp's loads, multiples of --capacity-rps (default 0.5 1 1.5 2)."),
    ] = None,
    shared_device: Annotated[
        bool,
        typer.Option(
            help="Simulators sharing one GPU (a shared_gpu table in --sim-config) name one device "
            "for the router, as real engines on one GPU do; off: the router is not told."
        ),
    ] = True,
    ordering: Annotated[
        str,
        typer.Option(help="Flow control's queue order: fcfs, edf (the earliest start deadline), cheapest."),
    ] = "fcfs",
    overload_memory_s: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Flow control: how long (simulated s) the model counts as overloaded after a request "
            "was queued or refused (room then refuses warm requests predicted late); 0: off. Default: the "
            "router's.",
        ),
    ] = None,
) -> None:
    """Flow control under overload: goodput, 429s and admitted TTFT per policy (simulators)."""
    known = {p.name: p for p in (*flow_plan.POLICIES, PEER)}
    for name in policy or ():
        if name not in known:
            raise typer.BadParameter(
                f"unknown policy {name!r}; known: {sorted(known)}", param_hint="--policy"
            )
    for name in scenario or ():
        if name not in ("ramp", "fairness", "priority"):
            raise typer.BadParameter(f"unknown scenario {name!r}", param_hint="--scenario")
    check_tokenizer(tokenizer, tokenizer_path, simulated=engines_file is None)
    # before_case resets only real engines, and those unless --keep-cache
    check_lmcache_api(lmcache_api, cases_reset=engines_file is not None and fresh_cache is not False)
    if engines_file is not None and speed != 1.0:
        raise typer.BadParameter("real engines run at speed 1", param_hint="--speed")
    if ordering not in get_args(Ordering):
        raise typer.BadParameter(
            f"unknown ordering {ordering!r}; known: {', '.join(get_args(Ordering))}", param_hint="--ordering"
        )
    if any(x <= 0 for x in load or ()):
        raise typer.BadParameter("a load is a positive multiple of the capacity", param_hint="--load")
    setup = FlowSetup(
        speed=speed,
        capacity_rps=capacity_rps,
        duration_s=duration_s,
        sim_config=sim_config,
        engines_file=engines_file,
        model=model,
        tokenizer=tokenizer,
        tokenizer_path=tokenizer_path,
        decision_log=decision_log,
        prefill_tokens_per_s=prefill_tokens_per_s,
        prefill_target_s=prefill_target_s,
        client_retries=client_retries,
        fresh_cache=fresh_cache is not False,  # only real engines are reset (before_case)
        redis_url=redis_url,
        lmcache_apis=tuple(lmcache_api or ()),
        ramp=tuple(load) if load else flow_plan.RAMP,
        shared_device=shared_device,
        ordering=cast(Ordering, ordering),  # checked against the Literal above
        overload_memory_s=overload_memory_s,
    )
    chosen = [known[n] for n in policy] if policy else list(flow_plan.POLICIES)
    folder = out / "flow"
    folder.mkdir(parents=True, exist_ok=True)
    # every request's outcome (engine, admission, predicted and actual TTFT): which admitted
    # requests came late, and on what prediction
    with gzip.open(folder / f"{label}.trace.jsonl.gz", "wt") as trace_file:
        results = run(
            setup,
            chosen,
            scenario or ["ramp", "fairness", "priority"],
            trace=lambda rec: trace_file.write(json.dumps(rec) + "\n"),
        )
    # a run on real engines with the SGLang router beside is judged by the GPU item too
    goals = flow_plan.goals(results) + flow_gpu_goals.goals(results)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(setup).items() if k != "log_dir"}
    meta["loadavg_end"] = list(os.getloadavg())
    meta["cpu_count"] = os.cpu_count()
    body = {"meta": meta, **asdict(results), "goals": [asdict(g) for g in goals]}
    (folder / f"{label}.json").write_text(json.dumps(body, indent=1))
    if results.ramp:
        plot(results, folder / f"{label}.png", simulated=engines_file is None)
    for g in goals:
        mark = "met" if g.met else "not met" if g.met is not None else "not run"
        typer.echo(f"{mark:>8}: {g.name} ({g.detail})")
    typer.echo(f"results: {folder / f'{label}.json'}, requests: {folder / f'{label}.trace.jsonl.gz'}")
