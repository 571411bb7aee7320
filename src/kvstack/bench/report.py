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


def bar_grid(
    path: Path,
    rows: Sequence[Mapping[str, Any]],
    *,
    panel_key: str,
    bar_key: str,
    metrics: Sequence[tuple[str, str]],
    title: str,
    refs: Mapping[str, tuple[str, str]] | None = None,
    clip_keys: Sequence[str] = (),
) -> None:
    """One subplot per (panel, metric): bars per ``bar_key`` value. ``metrics``: (row key, axis label).

    ``refs`` maps a metric to (row key, legend label) of a per-panel reference drawn as a dashed line
    (say, the oracle's hit rate over the hit-rate bars). Metrics in ``clip_keys`` cut the y axis at 3x
    the panel's median bar, so one policy far off the others does not flatten the rest; every bar is
    labelled with its value.
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
            top = 3 * sorted(vals)[len(vals) // 2]
            clipped = key in clip_keys and top > 0 and max(vals) > top
            if clipped:
                ax.set_ylim(0, top)
            labels = [f"{x:.3g}" for x in vals]
            ax.bar_label(drawn, labels=labels, fontsize=6, label_type="center" if clipped else "edge")
            for r in rows:
                if refs and key in refs and str(r[panel_key]) == panel:
                    ref_key, ref_label = refs[key]
                    ax.axhline(float(r[ref_key]), color="black", linestyle="--", linewidth=1, label=ref_label)
                    ax.legend(fontsize=6, loc="upper left")
                    break
            ax.set_xticks(range(len(bars)), bars, rotation=35, ha="right", fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
            if i == 0:
                ax.set_title(panel, fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
