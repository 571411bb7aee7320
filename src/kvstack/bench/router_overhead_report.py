"""What ``kvstack bench router`` concludes: each router's verdict against the goals (pure), and the
tables it prints. The JSON and the figure are written by the benchmark and
:mod:`kvstack.bench.router_overhead_plot`.
"""

from __future__ import annotations

import math
from typing import Any

from kvstack.bench.report import print_table

GOALS = {"added_p50_ms": 1.0, "added_p99_ms": 5.0, "rps_nonstream": 1000.0, "rps_stream": 500.0}


def verdict(direct: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one backend against the goals (pure)."""
    best_ns = max((lv["rps"] for lv in row["closed_nonstream"]), default=0.0)
    best_s = max((lv["rps"] for lv in row["closed_stream"]), default=0.0)
    top: dict[str, Any] | None = max(row["closed_nonstream"], key=lambda lv: lv["rps"], default=None)
    added50 = row["open"]["p50_ms"] - direct["p50_ms"]
    added99 = row["open"]["p99_ms"] - direct["p99_ms"]
    long = row.get("stream_long")
    long_ms = long["router_cpu_ms_per_request"] if long and long["rps"] else math.nan
    chunks = long["chunks_per_request"] if long else 0.0
    out: dict[str, Any] = {
        "backend": row["backend"],
        "added_p50_ms": added50,
        "added_p99_ms": added99,
        "rps_nonstream": best_ns,
        "rps_stream": best_s,
        # at the highest sustained rate: the router's CPU per request there (its fixed costs amortized)
        "cpu_ms_per_request": top.get("router_cpu_ms_per_request", math.nan) if top else math.nan,
        # per long streamed answer, and per relayed event of it (the open-loop long-stream phase)
        "cpu_ms_per_long_stream": long_ms,
        "cpu_us_per_chunk": long_ms * 1000 / chunks if chunks else math.nan,
        "meets_latency": added50 <= GOALS["added_p50_ms"] and added99 <= GOALS["added_p99_ms"],
        "meets_rps": best_ns >= GOALS["rps_nonstream"] and best_s >= GOALS["rps_stream"],
    }
    rss = row.get("soak", {}).get("rss_mb", [])
    if len(rss) >= 4:
        half = rss[len(rss) // 2 :]
        minutes = max(1e-9, (half[-1][0] - half[0][0]) / 60)
        out["rss_start_mb"], out["rss_end_mb"] = rss[0][1], rss[-1][1]
        out["rss_growth_mb_per_min_2nd_half"] = (half[-1][1] - half[0][1]) / minutes
    return out


def print_tables(
    direct: dict[str, Any],
    rows: list[dict[str, Any]],
    verdicts: list[dict[str, Any]],
    cfg: dict[str, Any],
    policy: str,
    engines: int,
    speed: float,
) -> None:
    """Every phase's row, then each router's verdict against the goals, on the terminal."""
    phases = [{"backend": "direct", "phase": k, **{**v, "rss_mb": ""}} for k, v in direct.items()]
    for r in rows:
        phases.append(
            {"backend": r["backend"], "phase": f"open {cfg['rate']:g}/s", **{**r["open"], "rss_mb": ""}}
        )
        for key in ("closed_nonstream", "closed_stream"):
            for lv in r[key]:
                phases.append({"backend": r["backend"], "phase": f"{key} c={lv['concurrency']}", **lv})
        if "soak" in r:
            phases.append({"backend": r["backend"], "phase": "soak", **{**r["soak"], "rss_mb": ""}})
        if "stream_long" in r:
            phase = f"stream {cfg['long_stream_tokens']} tokens {cfg['long_stream_rate']:g}/s"
            phases.append({"backend": r["backend"], "phase": phase, **{**r["stream_long"], "rss_mb": ""}})
    cols = ["backend", "phase", "requests", "errors", "rps", "p50_ms", "p99_ms", "chunks_per_request"]
    cols += ["router_cpu", "router_cpu_ms_per_request", "load_cpu", "load_avg_1m"]
    print_table(f"kvstack bench router: policy {policy}, {engines} sims at x{speed:g}", phases, cols)
    vcols = ["backend", "added_p50_ms", "added_p99_ms", "rps_nonstream", "rps_stream", "cpu_ms_per_request"]
    vcols += ["cpu_ms_per_long_stream", "cpu_us_per_chunk"]
    vcols += ["rss_start_mb", "rss_end_mb", "rss_growth_mb_per_min_2nd_half", "meets_latency", "meets_rps"]
    print_table("Goals: added p50 <= 1 ms, p99 <= 5 ms; >= 1000 req/s, >= 500 streamed", verdicts, vcols)
