"""Benchmark output: a rich table on the terminal, JSON on disk, and PNG bar charts."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def print_table(
    title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str], console: Console | None = None
) -> None:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in columns[:3] else "right")
    for row in rows:
        table.add_row(*(_fmt(row.get(c, "")) for c in columns))
    # Piped output (CI logs, files) has no terminal width: do not squeeze the columns.
    (console or Console(width=None if sys.stdout.isatty() else 200)).print(table)


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=True, default=float))


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Lay out a matplotlib figure, write it to ``path`` (creating its folder) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def bar_label(value: float) -> str:
    """A bar's value as printed over it: 3 significant digits, thousands written out (2,740 not 2.74e+03)."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def value_axis(
    values: Sequence[float], ref: float | None = None, log_ok: bool = False
) -> tuple[str, float, float]:
    """(scale, bottom, top) of a bar panel's y axis: every bar and the reference fit below the top.

    With ``log_ok`` and a tallest bar over 3x the median one, a log axis from half the smallest
    positive bar; else linear from 0. The top leaves room for the value labels over the bars.
    """
    top = max([*values, ref or 0.0, 0.0])
    positive = sorted(v for v in values if v > 0)
    if log_ok and positive and max(values) > 3 * sorted(values)[len(values) // 2]:
        return "log", positive[0] / 2, top * 4
    return "linear", 0.0, top * 1.25 if top > 0 else 1.0


def bar_grid(
    path: Path,
    rows: Sequence[Mapping[str, Any]],
    *,
    panel_key: str,
    bar_key: str,
    metrics: Sequence[tuple[str, str]],
    title: str,
    refs: Mapping[str, tuple[str, str]] | None = None,
    log_keys: Sequence[str] = (),
) -> None:
    """One subplot per (panel, metric): bars per ``bar_key`` value. ``metrics``: (row key, axis label).

    ``refs`` maps a metric to (row key, legend label) of a per-panel reference drawn as a dashed line
    (say, the oracle's hit rate over the hit-rate bars). Metrics in ``log_keys`` switch a panel to a
    log axis when its largest bar is over 3x the median one, so one policy far off the others neither
    flattens the rest nor gets cut off (a clipped axis hid 790 and 2,740 ms bars behind a 230 ms
    top). Every axis leaves headroom above its tallest bar or reference, so value labels, the
    reference line and the legend never sit on the frame.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(str(r[panel_key]) for r in rows))
    bars = list(dict.fromkeys(str(r[bar_key]) for r in rows))
    fig, axes = plt.subplots(
        len(metrics), len(panels), figsize=(3.2 * len(panels), 2.6 * len(metrics)), squeeze=False
    )
    colors = plt.get_cmap("tab10")
    for i, (key, label) in enumerate(metrics):
        for j, panel in enumerate(panels):
            ax = axes[i][j]
            vals = []
            for b in bars:
                match = [r for r in rows if str(r[panel_key]) == panel and str(r[bar_key]) == b]
                v = float(match[0].get(key, math.nan)) if match else math.nan
                vals.append(0.0 if math.isnan(v) else v)
            drawn = ax.bar(range(len(bars)), vals, color=[colors(k % 10) for k in range(len(bars))])
            ref = None
            if refs and key in refs:
                ref = next((float(r[refs[key][0]]) for r in rows if str(r[panel_key]) == panel), None)
            scale, bottom, top = value_axis(vals, ref, log_ok=key in log_keys)
            ax.set_yscale(scale)
            ax.set_ylim(bottom, top)
            ax.bar_label(drawn, labels=[bar_label(x) for x in vals], fontsize=6, label_type="edge")
            if ref is not None and refs:
                ax.axhline(ref, color="black", linestyle="--", linewidth=1, label=refs[key][1])
                ax.legend(fontsize=6, loc="upper left")
            ax.set_xticks(range(len(bars)), bars, rotation=35, ha="right", fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
            if i == 0:
                ax.set_title(panel, fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
