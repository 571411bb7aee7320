"""The routing benchmark's verdict: medians over runs and the issue's goals (pure).

Every row is one case run (see :func:`kvstack.bench.routing.run_case`). Ratios are of medians over
runs; the under-filled "never worse than the best baseline" goal reads the low end of a bootstrap
interval over the pooled repeat requests, so that parity within run-to-run noise is not a miss and
a real deficit is.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Sequence
from typing import Any

from kvstack.bench import stats

SAMPLES = "ttft_repeats_ms"  # a row's raw repeat TTFTs (ms); medians() leaves them out


def medians(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (workload, regime, policy): the median over its runs of every number, ``runs``."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["regime"], r["policy"]), []).append(r)
    out = []
    for runs in groups.values():
        merged: dict[str, Any] = {**runs[0], "runs": len(runs)}
        merged.pop(SAMPLES, None)
        for key, value in runs[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "run":
                merged[key] = statistics.median(r[key] for r in runs)
        merged.pop("run", None)
        out.append(merged)
    return out


# The goals: (entry key, bound, "max" if the value must stay at or below the bound, regimes)
GOALS: tuple[tuple[str, float, str, tuple[str, ...]], ...] = (
    ("ttft_p90_vs_round_robin", 0.5, "max", ("pressured",)),
    ("ttft_p90_vs_prefix_trie", 0.8, "max", ("pressured",)),
    # "never worse than the best baseline": not worse beyond noise, so the low end of the ratio's
    # interval (the ratio itself when the rows carry no samples) must not exceed 1
    ("ttft_p90_vs_best_baseline_low", 1.0, "max", ("under",)),
    ("hit_vs_oracle", 0.9, "min", ("under", "pressured")),
    ("load_cv", 0.2, "max", ("under", "pressured")),
)


def goals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals, checked per (workload, regime) against the measured rows.

    With repeated runs every value is the median over runs (ratios of medians), and each ratio's
    paired per-run values (run i against run i) show its spread as ``<ratio>_runs``. Against the
    best baseline, rows that carry their repeat TTFTs also give the pooled ratio over all runs and
    its 95% bootstrap interval; the under-filled goal reads that interval's low end. Each entry
    holds ``missed``: the goals that apply to its regime and were not met (a goal whose baseline
    was not run is neither met nor missed).
    """
    out = []
    summary = medians(rows)
    for key in sorted({(r["workload"], r["regime"]) for r in summary}):
        case = {r["policy"]: r for r in summary if (r["workload"], r["regime"]) == key}
        ours = case.get("cache_aware")
        if ours is None:
            continue
        entry: dict[str, Any] = {"workload": key[0], "regime": key[1], "runs": ours["runs"]}
        for baseline in ("round_robin", "prefix_trie"):
            if baseline in case:
                name = f"ttft_p90_vs_{baseline}"
                entry[name] = ours["ttft_p90"] / case[baseline]["ttft_p90"]
                paired = _paired_ratios(rows, key, baseline)
                if len(paired) > 1:
                    entry[f"{name}_runs"] = paired
        baselines = {p: r["ttft_p90"] for p, r in case.items() if p != "cache_aware"}
        if baselines:
            best = min(baselines, key=baselines.__getitem__)
            entry["best_baseline"] = best
            entry["ttft_p90_vs_best_baseline"] = ratio = ours["ttft_p90"] / baselines[best]
            ours_all, best_all = _pooled(rows, key, "cache_aware"), _pooled(rows, key, best)
            low, high = stats.quantile_ratio_interval(ours_all, best_all, 90.0)
            if not math.isnan(low):
                # the interval brackets the pooled ratio, which can differ from the ratio of medians
                pooled = stats.percentile(ours_all, 90.0) / stats.percentile(best_all, 90.0)
                entry["ttft_p90_vs_best_baseline_pooled"] = round(pooled, 3)
                entry["ttft_p90_vs_best_baseline_interval"] = [round(low, 3), round(high, 3)]
            entry["ttft_p90_vs_best_baseline_low"] = ratio if math.isnan(low) else low
        entry["hit_vs_oracle"] = ours["hit_vs_oracle"]
        entry["load_cv"] = ours["load_cv"]
        entry["missed"] = missed(entry)
        out.append(entry)
    return out


def _runs_of(rows: Sequence[dict[str, Any]], case: tuple[str, str], policy: str) -> Iterator[dict[str, Any]]:
    """The rows of ``policy`` in ``case`` (one per run)."""
    return (r for r in rows if (r["workload"], r["regime"]) == case and r["policy"] == policy)


def _pooled(rows: Sequence[dict[str, Any]], case: tuple[str, str], policy: str) -> list[float]:
    """Every repeat TTFT (ms) of ``policy`` in ``case``, all runs together."""
    return [t for r in _runs_of(rows, case, policy) for t in r.get(SAMPLES, ())]


def _paired_ratios(rows: Sequence[dict[str, Any]], case: tuple[str, str], baseline: str) -> list[float]:
    """Our TTFT p90 over ``baseline``'s, run by run (runs present for both)."""

    def by_run(policy: str) -> dict[int, float]:
        return {int(r.get("run", 0)): r["ttft_p90"] for r in _runs_of(rows, case, policy)}

    ours, theirs = by_run("cache_aware"), by_run(baseline)
    return [round(ours[i] / theirs[i], 3) for i in sorted(ours) if i in theirs]


def missed(entry: dict[str, Any]) -> list[str]:
    """Names of the goals in :data:`GOALS` that apply to ``entry``'s regime and are not met."""
    out = []
    for name, bound, kind, regimes in GOALS:
        if entry["regime"] not in regimes or name not in entry:
            continue
        value = float(entry[name])
        ok = value <= bound if kind == "max" else value >= bound
        if not ok:  # NaN fails both comparisons: a goal that could not be measured is missed
            out.append(name)
    return out
