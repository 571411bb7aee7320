"""Issue #23's goals per (engines, workload, load), from a ``kvstack bench gpu`` run's rows (pure).

For each row, kvstack's policy (``ours``, default ``cache_aware``) is compared with the baseline
(default the SGLang router's ``sglang_cache_aware``) run by run: run r of both replayed the same
trace (the matrix's default), so each pair is a like-for-like comparison. A goal is met when it
holds in every paired run:

- ``ttft_p50``, ``ttft_p90``: kvstack's <= the baseline's;
- ``prefix_hit_rate`` (the engines' GPU prefix-cache hits / queries): kvstack's >= the baseline's
  (a missing rate never meets it);
- ``failed``: kvstack failed no request in any of its runs (paired or not).

A row's outcome: ``met`` (all four), ``not_met`` (any not), ``no_baseline`` (the baseline has no
run paired with kvstack's), ``no_kvstack`` (kvstack did not run in it).

Compared and shown beside the goals, not counted in the outcome: ``cached_rate``, the prompt
tokens served from any cache (the GPU's prefix hits and LMCache's, from CPU or Redis). A router
that uses a second engine pays a compulsory GPU miss on the prompt every session shares, which
LMCache serves from Redis; one that leaves the engine idle does not (bench-results/lmcache
section 19): this column tells that apart from hits lost to placement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Outcome = Literal["met", "not_met", "no_baseline", "no_kvstack"]
LOWER_IS_BETTER = ("ttft_p50", "ttft_p90")
HIGHER_IS_BETTER = ("prefix_hit_rate",)
INFO = ("cached_rate",)  # higher is better; reported, not a goal
# the table's compared columns: metric, title, display scale (ms, %), decimals
COLUMNS = (
    ("ttft_p50", "TTFT p50 (ms)", 1000.0, 0),
    ("ttft_p90", "TTFT p90 (ms)", 1000.0, 0),
    ("prefix_hit_rate", "GPU hit %", 100.0, 1),
    ("cached_rate", "GPU+LMCache hit %", 100.0, 1),
)


@dataclass(frozen=True, slots=True)
class Goal:
    name: str
    met: bool
    ours: tuple[float | None, ...]  # one per paired run (failed: one per kvstack run)
    theirs: tuple[float | None, ...]


@dataclass(frozen=True, slots=True)
class Verdict:
    engines: int
    workload: str
    load: float
    outcome: Outcome
    runs: tuple[int, ...] = ()  # the paired runs
    goals: tuple[Goal, ...] = field(default_factory=tuple)
    info: tuple[Goal, ...] = field(default_factory=tuple)  # compared like goals, not in the outcome

    def as_json(self) -> dict[str, Any]:
        return {
            "engines": self.engines,
            "workload": self.workload,
            "load": self.load,
            "outcome": self.outcome,
            "runs": list(self.runs),
            "goals": {
                g.name: {"met": g.met, "kvstack": list(g.ours), "baseline": list(g.theirs)}
                for g in self.goals
            },
            "info": {
                g.name: {"better": g.met, "kvstack": list(g.ours), "baseline": list(g.theirs)}
                for g in self.info
            },
        }


def verdicts(
    rows: Sequence[Mapping[str, Any]], ours: str = "cache_aware", baseline: str = "sglang_cache_aware"
) -> list[Verdict]:
    """One verdict per (engines, workload, load) in ``rows``, in their first-seen order."""
    groups: dict[tuple[int, str, float], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((int(row["engines"]), str(row["workload"]), float(row["load"])), []).append(row)
    return [_verdict(key, group, ours, baseline) for key, group in groups.items()]


def _verdict(
    key: tuple[int, str, float], rows: Sequence[Mapping[str, Any]], ours: str, baseline: str
) -> Verdict:
    mine = {int(r["run"]): r for r in rows if r["policy"] == ours}
    peer = {int(r["run"]): r for r in rows if r["policy"] == baseline}
    if not mine:
        return Verdict(*key, outcome="no_kvstack")
    runs = tuple(sorted(set(mine) & set(peer)))
    if not runs:
        return Verdict(*key, outcome="no_baseline")
    goals = [
        _compare(name, [mine[r] for r in runs], [peer[r] for r in runs], lower=True)
        for name in LOWER_IS_BETTER
    ]
    goals += [
        _compare(name, [mine[r] for r in runs], [peer[r] for r in runs], lower=False)
        for name in HIGHER_IS_BETTER
    ]
    failed = tuple(float(mine[r]["errors"]) for r in sorted(mine))
    goals.append(
        Goal("failed", all(f == 0 for f in failed), failed, tuple(float(peer[r]["errors"]) for r in runs))
    )
    info = tuple(
        _compare(name, [mine[r] for r in runs], [peer[r] for r in runs], lower=False) for name in INFO
    )
    outcome: Outcome = "met" if all(g.met for g in goals) else "not_met"
    return Verdict(*key, outcome=outcome, runs=runs, goals=tuple(goals), info=info)


def _compare(
    name: str, mine: Sequence[Mapping[str, Any]], peer: Sequence[Mapping[str, Any]], lower: bool
) -> Goal:
    ours = tuple(_number(r.get(name)) for r in mine)
    theirs = tuple(_number(r.get(name)) for r in peer)
    met = all(
        a is not None and b is not None and (a <= b if lower else a >= b)
        for a, b in zip(ours, theirs, strict=True)
    )
    return Goal(name, met, ours, theirs)


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def table(
    found: Sequence[Verdict], ours: str = "cache_aware", baseline: str = "sglang_cache_aware"
) -> list[str]:
    """The verdicts as aligned text lines, kvstack's value / the baseline's per paired run."""
    head = ["engines", "workload", "load", *(title for _, title, _, _ in COLUMNS), "failed", "verdict"]
    body = []
    for v in found:
        cells = [str(v.engines), v.workload, f"{v.load:g}"]
        by_name = {g.name: g for g in (*v.goals, *v.info)}
        for name, _, scale, digits in COLUMNS:
            goal = by_name.get(name)
            cells.append(_pairs(goal, scale, digits) if goal else "-")
        failed = by_name.get("failed")
        cells.append(", ".join(f"{x:.0f}" for x in failed.ours) if failed else "-")
        cells.append(v.outcome.replace("_", " "))
        body.append(cells)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = [f"goals: {ours} vs {baseline} (kvstack / baseline per run)"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *body]]
    return lines


def _pairs(goal: Goal, scale: float, digits: int) -> str:
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x * scale:.{digits}f}"

    mark = "ok" if goal.met else "NO"
    return ", ".join(f"{fmt(a)}/{fmt(b)}" for a, b in zip(goal.ours, goal.theirs, strict=True)) + f" {mark}"
