"""The routing benchmark: the same workload trace through the router under each policy.

For every (workload, regime, policy) case it starts fresh simulated engines (calibrated speed, KV
events on) and a router, replays the trace open-loop, and measures what users see (TTFT, ITL,
throughput), what the engines saw (their own prefix-cache counters, requests per engine) and what
the router cost (decision time, CPU, RSS). An oracle bound on the hit rate comes from the trace.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvstack.bench import promtext, stats, workloads
from kvstack.bench.driver import DriverConfig, RequestResult, run_workload, wait_for_engines
from kvstack.bench.progress import BenchProgress, print_now
from kvstack.bench.routing_goals import SAMPLES
from kvstack.bench.routing_plan import POLICIES as POLICIES
from kvstack.common import tokenizer
from kvstack.common.procs import (
    ManagedProcess,
    cpu_seconds,
    exit_on_sigterm,
    free_ports,
    kvstack_argv,
    memory_mb,
    running,
)
from kvstack.engine.sim.cli import kv_events_flags
from kvstack.router.discovery.static import sim_engine_entry

MODEL = "kvstack/sim-8b"


@dataclass(slots=True)
class RoutingSetup:
    engines: int = 4
    num_gpu_blocks: int = 4096  # 64K tokens per engine: working sets stay small enough to run here
    block_size: int = 16
    speed: float = 1.0  # calibrated to the H200 reference
    scale: float = 1.0  # < 1 shrinks prompts for a quick run
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kvstack-bench-")))

    load: float = workloads.DEFAULT_LOAD  # offered prompt tokens / the cluster's cold prefill rate
    fill: dict[str, float] = field(default_factory=dict)  # regime -> working set / KV (default: its own)

    @property
    def capacity_tokens(self) -> int:
        return self.engines * self.num_gpu_blocks * self.block_size

    @property
    def prefill_tokens_per_s(self) -> float:
        """The cluster's cold prefill throughput in wall-clock time (speed scales simulated time)."""
        return self.engines * workloads.PREFILL_TOKENS_PER_S * self.speed


def _stack(
    setup: RoutingSetup, policy: str, case: str, seed: int
) -> tuple[list[ManagedProcess], str, list[str]]:
    ports = free_ports(3 * setup.engines + 1)
    log_dir = setup.log_dir / case
    sims: list[ManagedProcess] = []
    engines: list[dict[str, Any]] = []
    for i in range(setup.engines):
        http, pub, replay = ports[3 * i : 3 * i + 3]
        url = f"http://127.0.0.1:{http}"
        sims.append(
            ManagedProcess(
                f"sim{i}",
                [
                    *kvstack_argv(),
                    "engine",
                    "sim",
                    "--port",
                    str(http),
                    "--model",
                    MODEL,
                    "--num-gpu-blocks",
                    str(setup.num_gpu_blocks),
                    "--block-size",
                    str(setup.block_size),
                    "--speed",
                    str(setup.speed),
                    *kv_events_flags(pub, replay),
                ],
                log_dir,
                ready_url=f"{url}/health",
            )
        )
        engines.append(
            sim_engine_entry(f"sim{i}", http=http, kv_events=pub, kv_replay=replay, models=[MODEL])
        )
    log_dir.mkdir(parents=True, exist_ok=True)
    engines_file = log_dir / "engines.yaml"
    engines_file.write_text(yaml.safe_dump(engines))
    router_url = f"http://127.0.0.1:{ports[-1]}"
    router = ManagedProcess(
        "router",
        [
            *kvstack_argv(),
            "router",
            "--port",
            str(ports[-1]),
            "--engines-file",
            str(engines_file),
            "--policy",
            policy,
            "--log-level",
            "warning",
        ],
        log_dir,
        env={
            "KVSTACK_ROUTER_ACCESS_LOG": "false",
            "KVSTACK_ROUTER_EXPOSE_ENGINE_HEADER": "true",
            # the trie places unmatched prompts at random: a seed per run makes its draws repeatable
            "KVSTACK_ROUTER_PREFIX_TRIE__SEED": str(seed),
            # the policies alone: flow control's late binding would make placement depend on timing
            "KVSTACK_ROUTER_FLOW_CONTROL__ENABLED": "false",
        },
        ready_url=f"{router_url}/ready",
    )
    return [*sims, router], router_url, [e["url"] for e in engines]


def oracle_hit_rate(results: Sequence[RequestResult], block_size: int) -> float:
    """Hit-token share for one engine with an unlimited cache, over the requests as sent."""
    done = sorted((r for r in results if r.ok), key=lambda r: r.sent_at)
    prompts = [tokenizer.apply_chat_template([(m["role"], m["content"]) for m in r.messages]) for r in done]
    outputs = [tokenizer.encode(r.answer) for r in done]
    hits = workloads.oracle_hit_tokens(prompts, outputs, block_size)
    total = sum(len(p) for p in prompts)
    return sum(hits) / total if total else 0.0


def run_case(
    setup: RoutingSetup,
    workload: workloads.Workload,
    policy: str,
    on_request: Callable[[], None] = lambda: None,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """One trace through a fresh stack under ``policy``; ``seed`` seeds the policy's random draws;
    ``on_request`` is called as each request completes."""
    case = f"{workload.name}-{workload.regime}-{policy}-{seed}"
    procs, router_url, engine_urls = _stack(setup, policy, case, seed)

    def on_done(_r: RequestResult) -> None:
        on_request()

    with running(procs, timeout=60):
        wait_for_engines(router_url, setup.engines)
        router = procs[-1]
        before = [promtext.scrape(f"{u}/metrics") for u in engine_urls]
        r_before = promtext.scrape(f"{router_url}/metrics")
        cpu0 = cpu_seconds(router.pid)
        sims0 = sum(cpu_seconds(p.pid) for p in procs[:-1])
        load0 = os.getloadavg()[0]
        results, wall = asyncio.run(run_workload(DriverConfig(router_url, MODEL), workload, on_done))
        load1 = os.getloadavg()[0]
        cpu1, rss_mb = cpu_seconds(router.pid), memory_mb(router.pid, "VmHWM")
        sims1 = sum(cpu_seconds(p.pid) for p in procs[:-1])
        after = [promtext.scrape(f"{u}/metrics") for u in engine_urls]
        r_after = promtext.scrape(f"{router_url}/metrics")

    ok = [r for r in results if r.ok]
    first = workloads.first_reads(workload)
    repeats = [r for r in ok if (r.session_id, r.turn) not in first]
    hits = sum(
        promtext.delta(b, a, "vllm:prefix_cache_hits_total") for b, a in zip(before, after, strict=True)
    )
    queries = sum(
        promtext.delta(b, a, "vllm:prefix_cache_queries_total") for b, a in zip(before, after, strict=True)
    )
    per_engine = [
        promtext.delta(b, a, "vllm:request_success_total") for b, a in zip(before, after, strict=True)
    ]
    repeat_ttft = [r.ttft for r in repeats if r.ttft is not None]
    ttft = stats.summarize(repeat_ttft)
    ttft_all = stats.summarize([r.ttft for r in ok if r.ttft is not None])
    itl = stats.summarize([x for r in ok for x in r.itl])
    oracle = oracle_hit_rate(ok, setup.block_size)
    hit_rate = hits / queries if queries else 0.0
    # the engines' own TTFT (queue + prefill + first step) beside the client's: the rest is the
    # router, the network and the client, so a policy's own cost shows apart from its choices
    engine_ttft = [
        sum(
            promtext.delta(b, a, f"vllm:time_to_first_token_seconds_{part}")
            for b, a in zip(before, after, strict=True)
        )
        for part in ("sum", "count")
    ]
    client_ttft = [r.ttft for r in ok if r.ttft is not None]
    engine_mean = engine_ttft[0] / engine_ttft[1] if engine_ttft[1] else 0.0
    client_mean = sum(client_ttft) / len(client_ttft) if client_ttft else 0.0
    return {
        "workload": workload.name,
        "regime": workload.regime,
        "policy": policy,
        "seed": seed,
        "fill": round(workload.fill, 3),
        "requests": len(results),
        "request_rate": round(workload.notes.get("request_rate", 0.0), 2),
        "errors": len(results) - len(ok),
        "wall_s": wall,
        "ttft_p50": ttft["p50"],
        "ttft_p90": ttft["p90"],
        "ttft_p99": ttft["p99"],
        # the above exclude first reads (cold under any policy); these include them
        "ttft_all_p50": ttft_all["p50"],
        "ttft_all_p90": ttft_all["p90"],
        "ttft_all_p99": ttft_all["p99"],
        "first_reads": len(first),
        "itl_p50": itl["p50"],
        "itl_p90": itl["p90"],
        "engine_ttft_mean": engine_mean,
        "outside_engine_ttft_mean": client_mean - engine_mean,
        "output_tok_s": sum(r.completion_tokens for r in ok) / wall if wall else 0.0,
        "hit_rate": hit_rate,
        "oracle_hit_rate": oracle,
        "hit_vs_oracle": hit_rate / oracle if oracle else float("nan"),
        "load_cv": stats.coefficient_of_variation(per_engine),
        "decision_p99_ms": 1000
        * promtext.histogram_quantile(r_after, "kvstack_router_routing_decision_seconds", 0.99, r_before),
        # the policy's own share of each request's path: its decision and its prompt's tokens
        "decision_mean_ms": _mean_ms(r_before, r_after, "kvstack_router_routing_decision_seconds"),
        "tokenize_mean_ms": _mean_ms(r_before, r_after, "kvstack_router_tokenize_seconds"),
        # arrival to the engine request: the router's whole share of the TTFT (all requests)
        "dispatch_mean_ms": _mean_ms(r_before, r_after, "kvstack_router_dispatch_seconds"),
        "router_cpu_s": cpu1 - cpu0,
        "router_rss_mb": rss_mb,
        "sims_cpu_s": sims1 - sims0,
        # the machine's 1-minute load average before and after the case: contention check
        "loadavg": [round(load0, 2), round(load1, 2)],
        "requests_per_engine": per_engine,
        "route_reasons": _reasons(r_before, r_after),
        # every repeat's TTFT, for the noise interval of the under-filled goal (see goals())
        SAMPLES: [round(1000 * t, 3) for t in repeat_ttft],
    }


def _mean_ms(before: promtext.Samples, after: promtext.Samples, histogram: str) -> float:
    count = promtext.delta(before, after, f"{histogram}_count")
    return 1000 * promtext.delta(before, after, f"{histogram}_sum") / count if count else 0.0


def _reasons(before: promtext.Samples, after: promtext.Samples) -> dict[str, float]:
    """Routing decisions by reason during the run (why the policy chose what it chose)."""
    out: dict[str, float] = {}
    for (name, labels), value in after.items():
        if name == "kvstack_router_routing_decisions_total":
            reason = dict(labels).get("reason", "")
            out[reason] = out.get(reason, 0.0) + value - before.get((name, labels), 0.0)
    return out


def run(
    setup: RoutingSetup,
    names: Sequence[str],
    regimes: Sequence[workloads.Regime],
    policies: Sequence[str],
    progress: Callable[[str], None] | None = None,
    *,
    repeat: int = 1,
    show_bar: bool | None = None,
) -> list[dict[str, Any]]:
    """Every (workload, regime) trace through every policy, ``repeat`` times (rows carry ``run``).

    Runs interleave (all policies, then all again), so a drift of the machine meets every policy.
    Progress counts requests over the whole run (``show_bar``: see :class:`BenchProgress`); the
    run's lines go to ``progress`` (default: printed, above the bar when there is one).
    """
    exit_on_sigterm()  # running() then stops the case's engines and router
    traces = [
        workloads.build(
            name,
            setup.capacity_tokens,
            regime,
            scale=setup.scale,
            prefill_tokens_per_s=setup.prefill_tokens_per_s,
            load=setup.load,
            fill=setup.fill.get(regime),
        )
        for name in names
        for regime in regimes
    ]
    total = sum(w.num_requests for w in traces) * repeat * len(policies)
    rows = []
    bar = BenchProgress("bench routing", total, "requests", show_bar=show_bar, say=progress or print_now)
    with bar:
        say = progress or bar.log
        for workload in traces:
            say(
                f"{workload.name} / {workload.regime}: {workload.num_requests} requests at "
                f"{workload.notes.get('request_rate', 0.0):.1f}/s, working set "
                f"{workload.fill:.0%} of {setup.capacity_tokens} KV tokens"
            )
            for run_index in range(repeat):
                for policy in policies:
                    case = run_case(setup, workload, policy, bar.advance, seed=run_index)
                    row = {**case, "run": run_index}
                    say(
                        f"  {policy:>13}{f' (run {run_index + 1}/{repeat})' if repeat > 1 else ''}: "
                        f"TTFT p90 {row['ttft_p90'] * 1000:7.1f} ms, hit rate "
                        f"{row['hit_rate']:.1%} (oracle {row['oracle_hit_rate']:.1%}), "
                        f"load CV {row['load_cv']:.2f}, errors {row['errors']}, loadavg {row['loadavg']}"
                    )
                    rows.append(row)
    return rows
