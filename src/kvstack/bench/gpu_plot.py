"""The picture of ``kvstack bench gpu`` runs: client TTFT and ITL, the engines' hit rates, and the
router's predicted hit tokens against what the engines counted, one bar group per case."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvstack.bench.report import save_figure


def plot_rows(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Flat bars for the plot: one per (run label, workload, policy[, engines, load, run])."""
    return [
        {
            "name": f"{label}\n{row['workload']}\n{row['policy']}"
            + (f"\n{row['engines']} eng, load {row['load']:g}, run {row['run']}" if "run" in row else ""),
            "ttft_p50": 1000 * row["ttft_p50"],
            "ttft_p90": 1000 * row["ttft_p90"],
            "itl_p50": 1000 * row["itl_p50"],
            "prefix_hit_rate": 100 * (row["prefix_hit_rate"] or 0.0),
            "external_hit_rate": 100 * (row["external_hit_rate"] or 0.0),
            "predicted": row["router"]["predicted_hit_tokens"],
            "counted": row["engine"]["prefix_hits"],
        }
        for label, rows in runs.items()
        for row in rows
    ]


def plot(out: Path, png: Path | None = None, labels: Sequence[str] = ()) -> Path:
    """One PNG of the runs ``labels`` (default: every LABEL.json under ``out``): TTFT, hits, predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = [out / f"{label}.json" for label in labels] if labels else sorted(out.glob("*.json"))
    runs = {p.stem: json.loads(p.read_text())["cases"] for p in files}
    bars = plot_rows(runs)
    xs = list(range(len(bars)))
    names = [b["name"] for b in bars]
    fig, axes = plt.subplots(3, 1, figsize=(max(8, 1.5 * len(bars)), 12))
    w = 0.27
    panels = [
        (axes[0], ("ttft_p50", "ttft_p90", "itl_p50"), "ms", "TTFT p50 / p90 and ITL p50 (client side)"),
        (axes[1], ("prefix_hit_rate", "external_hit_rate"), "%", "engine prefix-cache and LMCache hit rates"),
        (axes[2], ("predicted", "counted"), "tokens", "router predicted hit tokens vs engines' prefix hits"),
    ]
    for ax, keys, unit, title in panels:
        for k, key in enumerate(keys):
            ax.bar([x + (k - (len(keys) - 1) / 2) * w for x in xs], [b[key] for b in bars], w, label=key)
        ax.set_title(title)
        if unit == "ms":
            ax.set_yscale("log")  # a queued round-robin p90 would flatten every other bar
        ax.set_ylabel(unit)
        ax.set_xticks(xs, names, fontsize=7)
        # Beside the axes, never over them: inside, it covered the last case's bars.
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0.0)
    target = png or out / "gpu.png"
    save_figure(fig, target)
    return target


MATRIX_PANELS: tuple[tuple[str, float, str], ...] = (
    ("ttft_p50", 1000.0, "TTFT p50 (ms)"),
    ("ttft_p90", 1000.0, "TTFT p90 (ms)"),
    ("prefix_hit_rate", 100.0, "GPU prefix hit %"),
)


def matrix_bars(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A matrix run's values for the plot: per (engines, workload, load) group and policy, one value
    per run of each panel's metric; the group's name carries its verdict."""
    outcome = {(v["engines"], v["workload"], v["load"]): v["outcome"] for v in doc.get("verdict", [])}
    groups: list[tuple[int, str, float]] = []
    policies: list[str] = []
    values: dict[str, dict[tuple[tuple[int, str, float], str], list[float]]] = {
        m: {} for m, _, _ in MATRIX_PANELS
    }
    for row in doc["cases"]:
        group = (row["engines"], row["workload"], row["load"])
        if group not in groups:
            groups.append(group)
        if row["policy"] not in policies:
            policies.append(row["policy"])
        for metric, scale, _ in MATRIX_PANELS:
            value = row.get(metric)
            values[metric].setdefault((group, row["policy"]), []).append(
                float("nan") if value is None else scale * value
            )
    names = [
        f"{k} engines\n{w}\nload {load:g}\n{outcome.get((k, w, load), '-').replace('_', ' ')}"
        for k, w, load in groups
    ]
    return {"groups": groups, "names": names, "policies": policies, "values": values}


def plot_matrix(result: Path, png: Path) -> Path:
    """One PNG of a matrix run: per panel, a bar per policy and group (the mean over runs) with each
    run as a dot; the x labels carry the group's verdict."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = matrix_bars(json.loads(result.read_text()))
    groups, policies = bars["groups"], bars["policies"]
    fig, axes = plt.subplots(len(MATRIX_PANELS), 1, figsize=(max(8, 1.2 * len(groups) * len(policies)), 11))
    w = 0.8 / len(policies)
    for ax, (metric, _, title) in zip(axes, MATRIX_PANELS, strict=True):
        for k, pol in enumerate(policies):
            xs = [g + (k - (len(policies) - 1) / 2) * w for g in range(len(groups))]
            runs = [bars["values"][metric].get((group, pol), []) for group in groups]
            means = [sum(r) / len(r) if r else float("nan") for r in runs]
            ax.bar(xs, means, w, label=pol)
            for x, r in zip(xs, runs, strict=True):
                ax.plot([x] * len(r), r, "k.", markersize=5)
        if metric.startswith("ttft"):
            ax.set_yscale("log")  # a saturated round robin would flatten every other bar
            plain = matplotlib.ticker.FuncFormatter(lambda y, _pos: f"{y:,.0f}")
            ax.yaxis.set_major_formatter(plain)  # 80, not 8 x 10^1
            ax.yaxis.set_minor_formatter(plain)
            ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_title(f"{title}: bar = mean over runs, dots = runs")
        ax.set_xticks(range(len(groups)), bars["names"], fontsize=7)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0.0)
    save_figure(fig, png)
    return png
