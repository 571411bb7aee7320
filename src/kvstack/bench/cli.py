"""``kvstack bench``: benchmarks that write JSON results and PNG plots under ``bench-results/``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(help="Benchmarks: write JSON results and PNG plots.", no_args_is_help=True)

# What `pip install 'kvstack[bench]'` adds; the runtime wheel and the images do without it.
_BENCH_EXTRA = ("matplotlib",)


@app.callback()
def _needs_the_bench_extra() -> None:
    """Benchmarks plot with matplotlib, which only the ``bench`` extra installs."""
    missing = [name for name in _BENCH_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        typer.echo(f"kvstack bench needs {', '.join(missing)}: pip install 'kvstack[bench]'", err=True)
        raise typer.Exit(2)


OutOption = Annotated[Path, typer.Option("--out", help="Results folder.")]


_COLUMNS = {
    "workload": "workload",
    "regime": "regime",
    "policy": "policy",
    "request_rate": "req/s",
    "ttft_p50": "TTFT p50",
    "ttft_p90": "TTFT p90",
    "ttft_p99": "TTFT p99",
    "ttft_all_p90": "p90 all",
    "itl_p50": "ITL p50",
    "output_tok_s": "tok/s",
    "hit_rate": "hit %",
    "oracle_hit_rate": "oracle %",
    "load_cv": "load CV",
    "decision_p99_ms": "route p99",
    "router_cpu_s": "router CPU s",
    "router_rss_mb": "router RSS MB",
    "errors": "errors",
}
_MS = {"ttft_p50", "ttft_p90", "ttft_p99", "ttft_all_p90", "itl_p50"}
_PCT = {"hit_rate", "oracle_hit_rate"}


def _display(row: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, title in _COLUMNS.items():
        value = row.get(key, "")
        if key in _MS and isinstance(value, float):
            value = 1000 * value
        elif key in _PCT and isinstance(value, float):
            value = 100 * value
        out[title] = value
    return out


@app.command("routing")
def routing(
    out: OutOption = Path("bench-results"),
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="A small run in under 2 minutes: 2 engines, 2 workloads (under-filled), round_robin "
            "vs cache_aware, once; results-quick.json and routing-quick.png.",
        ),
    ] = False,
    workload: Annotated[
        list[str] | None,
        typer.Option(help="multi_round_qa, shared_prefix, long_doc_qa, long_doc_qa_interleave."),
    ] = None,
    regime: Annotated[
        list[str] | None,
        typer.Option(help="under (<=60% of KV; 50% by default) or pressured (>=70%; 90% by default)."),
    ] = None,
    policy: Annotated[list[str] | None, typer.Option(help="Policies to compare (default: all).")] = None,
    engines: Annotated[int | None, typer.Option(min=1, help="Simulated engines (default 4).")] = None,
    num_gpu_blocks: Annotated[
        int | None, typer.Option(min=1, help="KV blocks per engine (default 4096).")
    ] = None,
    speed: Annotated[
        float | None, typer.Option(help="Simulator speed (default 1.0 = H200-calibrated real time).")
    ] = None,
    scale: Annotated[float | None, typer.Option(help="Prompt-size scale (default 1; <1 is quicker).")] = None,
    load: Annotated[
        float, typer.Option(help="Offered prompt tokens over the cluster's cold prefill throughput.")
    ] = 0.75,
    repeat: Annotated[
        int | None,
        typer.Option(
            help="Runs per case (default 3); goals and plot use medians (a random baseline needs several)."
        ),
    ] = None,
    fill_under: Annotated[
        float | None, typer.Option(help="Working set of the under regime, a fraction of KV (<= 0.6).")
    ] = None,
    fill_pressured: Annotated[
        float | None, typer.Option(help="Working set of the pressured regime, a fraction of KV (0.7-1.0).")
    ] = None,
) -> None:
    """Compare routing policies on the same traces: TTFT, hit rate vs an oracle, load balance, overhead."""
    import os

    from kvstack.bench import decision, report, routing_goals, routing_plan
    from kvstack.bench import routing as bench

    if load <= 0:
        raise typer.BadParameter("must be positive", param_hint="--load")
    # the regimes: a working set <= 60% of the cluster's KV, and >= 70%
    if fill_under is not None and not 0 < fill_under <= 0.6:
        raise typer.BadParameter("must be in (0, 0.6]", param_hint="--fill-under")
    if fill_pressured is not None and not 0.7 <= fill_pressured <= 1.0:
        raise typer.BadParameter("must be in [0.7, 1.0]", param_hint="--fill-pressured")
    plan = routing_plan.plan(  # a bad option raises typer's usage error (bench.option_error)
        quick,
        workloads=workload,
        regimes=regime,
        policies=policy,
        repeat=repeat,
        engines=engines,
        num_gpu_blocks=num_gpu_blocks,
        speed=speed,
        scale=scale,
    )
    fills = {"under": fill_under, "pressured": fill_pressured}
    setup = bench.RoutingSetup(
        engines=plan.engines,
        num_gpu_blocks=plan.num_gpu_blocks,
        speed=plan.speed,
        scale=plan.scale,
        load=load,
        fill={regime: f for regime, f in fills.items() if f is not None},
    )
    load_start = os.getloadavg()
    # In-process, before any stack starts: the decision's own cost on a populated index.
    micro = decision.run(engines=plan.engines)
    typer.echo(
        f"decision microbenchmark (8K-token prompts, {micro['indexed_blocks']} indexed blocks): "
        f"p99 {micro['cached_tokens_ms']['p99']:.3f} ms with cached tokens, "
        f"{micro['uncached_tokens_ms']['p99']:.3f} ms hashing new ones"
    )
    rows = bench.run(setup, plan.workloads, plan.regimes, plan.policies, repeat=plan.repeat)
    folder = out / "routing"
    suffix = "-quick" if plan.quick else ""
    goal_rows = routing_goals.goals(rows)
    report.write_json(
        folder / f"results{suffix}.json",
        {
            "setup": {
                "quick": plan.quick,
                "engines": plan.engines,
                "num_gpu_blocks": plan.num_gpu_blocks,
                "speed": plan.speed,
                "scale": plan.scale,
                "capacity_tokens": setup.capacity_tokens,
                "load": load,
                "repeat": plan.repeat,
                "fill": setup.fill,
                "prefill_tokens_per_s": setup.prefill_tokens_per_s,
                "cpu_count": os.cpu_count(),
                "niceness": os.nice(0),  # a run under `nice -n -10` keeps other work from skewing it
                "loadavg_start": list(load_start),
                "loadavg_end": list(os.getloadavg()),
            },
            "rows": rows,
            "goals": goal_rows,
            "decision_microbenchmark": micro,
        },
    )
    summary = routing_goals.medians(rows)
    label = "quick run: " if plan.quick else ""
    title = f"Routing policies ({label}times in ms)" + (
        f", medians of {plan.repeat} runs" if plan.repeat > 1 else ""
    )
    report.print_table(title, [_display(r) for r in summary], list(_COLUMNS.values()))
    if goal_rows:
        columns = list(dict.fromkeys(k for entry in goal_rows for k in entry))
        report.print_table(f"Goals (cache_aware{', quick run' if plan.quick else ''})", goal_rows, columns)
    png = folder / f"routing{suffix}.png"
    plot_routing(summary, png, engines=plan.engines, load=load, quick=plan.quick)
    typer.echo(f"results: {folder / f'results{suffix}.json'}, plot: {png}")


def plot_routing(
    rows: list[dict[str, Any]], path: Path, *, engines: int, load: float, quick: bool = False
) -> None:
    """The routing PNG: per case, bars per policy for TTFT p90 (repeats, all), hit rate, load CV."""
    from kvstack.bench import report

    plotted = [
        {
            **r,
            "panel": f"{r['workload']}\n{r['regime']}",
            "ttft_p90_ms": 1000 * r["ttft_p90"],
            "ttft_all_p90_ms": 1000 * r["ttft_all_p90"],
        }
        for r in rows
    ]
    report.bar_grid(
        path,
        plotted,
        panel_key="panel",
        bar_key="policy",
        metrics=[
            ("ttft_p90_ms", "TTFT p90, repeats (ms)"),
            ("ttft_all_p90_ms", "TTFT p90, all (ms)"),
            ("hit_rate", "engine hit rate"),
            ("load_cv", "load CV"),
        ],
        title=f"Routing policies on the same traces ({engines} simulated H200 engines, load {load}"
        + (", quick run)" if quick else ")"),
        log_keys=("ttft_p90_ms", "ttft_all_p90_ms"),
        refs={"hit_rate": ("oracle_hit_rate", "oracle")},
    )


def _register_benchmarks() -> None:
    # Benchmarks owned by other modules register here so `kvstack bench --help` lists them all.
    from kvstack.bench.flow import flow_bench
    from kvstack.bench.gpu import gpu_proof
    from kvstack.bench.lora import lora_bench
    from kvstack.bench.router_overhead import router_overhead
    from kvstack.bench.sim_throughput import sim_throughput
    from kvstack.bench.soak import soak

    app.command("sim")(sim_throughput)
    app.command("router")(router_overhead)
    app.command("gpu")(gpu_proof)
    app.command("soak")(soak)
    app.command("lora")(lora_bench)
    app.command("flow")(flow_bench)


_register_benchmarks()


@app.command("replot")
def replot_command(
    files: Annotated[
        list[Path],
        typer.Argument(
            help="Results JSON: routing results.json, soak-LABEL.json, router_overhead.json, or "
            "GPU runs (LABEL.json, several for one figure).",
            exists=True,
            dir_okay=False,
        ),
    ],
    png: Annotated[
        Path | None, typer.Option("--png", help="Figure to write; default: where the benchmark writes it.")
    ] = None,
) -> None:
    """Draw a benchmark's PNG again from its committed JSON (no re-run)."""
    from kvstack.bench.replot import ReplotError, replot

    try:
        typer.echo(f"wrote {replot(files, png)}")
    except ReplotError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err


@app.command("autoscale")
def autoscale(
    out: OutOption = Path("bench-results"),
    cluster: Annotated[
        bool,
        typer.Option(
            "--cluster/--model",
            help="Real pods: a kwok test cluster, the operator, Prometheus and a router (minutes); "
            "default: the fleet model (seconds).",
        ),
    ] = False,
    scale: Annotated[
        int, typer.Option(min=1, help="--cluster: divide every autoscaling period by this.")
    ] = 5,
    base_rate: Annotated[float, typer.Option(min=0.01, help="--cluster: requests/s before and after.")] = 0.2,
    step_rate: Annotated[float, typer.Option(min=0.01, help="--cluster: requests/s during the step.")] = 4.5,
    warm: Annotated[float, typer.Option(min=0, help="--cluster: seconds of base load before the step.")] = 20,
    step: Annotated[float, typer.Option(min=1, help="--cluster: seconds the step lasts.")] = 140,
    after: Annotated[float, typer.Option(min=0, help="--cluster: seconds of base load after it.")] = 80,
    model_load: Annotated[
        float, typer.Option(min=0, help="--cluster: a pod's model load in seconds, before scaling.")
    ] = 60,
    variant: Annotated[
        list[str] | None,
        typer.Option(help="--cluster: 'kvstack defaults' and/or 'HPA-style' (default both)."),
    ] = None,
) -> None:
    """Autoscaler reaction to a load step.

    Default (model mode): a fluid model of a fleet (pod start-up delay, per-pod service rate) driven
    through the operator's real decision function: our defaults vs the plain HPA formula vs one pod
    per minute; writes autoscale.json/png. With --cluster: real (kwok) pods, each served by a
    simulator, the real operator on a real Prometheus, a real router, an open-loop load step; our
    defaults vs HPA-style settings; writes cluster.json/png.
    """
    from kvstack.bench import report

    folder = out / "autoscale"
    if cluster:
        if importlib.util.find_spec("kvstack_testing") is None:
            typer.echo(
                "--cluster runs the from-source test cluster: run it from a kvstack checkout after "
                "`make venv` (it installs the kvstack_testing harness)",
                err=True,
            )
            raise typer.Exit(2)
        from kvstack.bench.autoscale_cluster import ClusterBench, main_run
        from kvstack.bench.autoscale_plan import Phases, variants

        known = [v.name for v in variants(scale, 1)]
        for name in variant or ():
            if name not in known:
                raise typer.BadParameter(f"unknown variant {name!r}; known: {known}", param_hint="--variant")
        phases = Phases(warm_s=warm, step_s=step, after_s=after, base_rate=base_rate, step_rate=step_rate)
        bench = ClusterBench(scale=scale, phases=phases, only=tuple(variant or ()), model_load_s=model_load)
        import sys

        # Bound now: kopf's runner swaps sys.stderr for a capture while the operator runs.
        stderr = sys.stderr
        result = main_run(folder, bench, lambda line: print(line, file=stderr, flush=True))
        columns = {
            "replicas_before": "before",
            "peak_replicas": "peak",
            "decision_s": "decision s",
            "ready_s": "Ready s",
            "serving_s": "serving s",
            "all_ready_s": "all Ready s",
            "all_serving_s": "all serving s",
            "scale_down_s": "down s",
            "reversals": "reversals",
            "replica_seconds": "replica-s",
            "step_ttft_p50_s": "TTFT p50",
            "step_ttft_p90_s": "TTFT p90",
            "errors": "errors",
        }
        rows = [
            {"variant": r["name"], **{title: r["summary"][key] for key, title in columns.items()}}
            for r in result["runs"]
        ]
        report.print_table(
            f"Autoscaling on a kwok cluster (seconds after the load step; periods / {scale})",
            rows,
            ["variant", *columns.values()],
        )
        typer.echo(f"results: {folder / 'cluster.json'}, plot: {folder / 'cluster.png'}")
        return

    from kvstack.operator.bench import summary, write

    runs = write(folder)
    rows = [summary(r) for r in runs]
    report.print_table("Autoscaler reaction to load steps (fleet model)", rows, list(rows[0].keys()))
    typer.echo(f"results: {folder / 'autoscale.json'}, plot: {folder / 'autoscale.png'}")


# What `kvstack bench all` (and `make bench`) runs, in order: the cheap benchmarks first.
ALL_BENCHMARKS = ("sim", "autoscale", "router", "routing", "soak")


@app.command("all")
def run_all(
    skip: Annotated[list[str] | None, typer.Option(help="Benchmarks to leave out; repeat.")] = None,
) -> None:
    """Every benchmark with its defaults, one process each; results under bench-results/."""
    import subprocess
    import sys
    import time

    unknown = set(skip or ()) - set(ALL_BENCHMARKS)
    if unknown:
        raise typer.BadParameter(f"unknown benchmark(s): {', '.join(sorted(unknown))}", param_hint="--skip")
    failed = []
    for name in ALL_BENCHMARKS:
        if name in (skip or ()):
            continue
        typer.echo(f"== kvstack bench {name}", err=True)
        t0 = time.monotonic()
        code = subprocess.call([sys.executable, "-m", "kvstack", "bench", name])
        typer.echo(f"== kvstack bench {name}: exit {code} after {time.monotonic() - t0:.0f} s", err=True)
        if code:
            failed.append(name)
    if failed:
        typer.echo(f"failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)
