"""Render a dashboard from a live Prometheus into one PNG grid, so it can be looked at without Grafana.

Time series panels become line charts (one line per series, Grafana's legend format applied); stat
panels become one large number. Panels with no data say so instead of staying blank.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvstack.dashboards.panels import Dashboard, Panel
from kvstack.dashboards.promql import expand
from kvstack.observability.prometheus import PrometheusAPI

COLUMNS = 3
STATS_PER_ROW = 6
STAT_HEIGHT, SERIES_HEIGHT = 1.6, 3.4
MAX_SERIES = 8
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's ``{{label}}`` legend format applied to one series' labels."""
    if not fmt or fmt == "__auto":
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
    return _LEGEND.sub(lambda m: labels.get(m.group(1), ""), fmt).strip()


def scale(unit: str, values: list[float]) -> tuple[float, str]:
    """(factor, axis label) that shows ``unit`` readably: ms for small seconds, % for ratios."""
    finite = [abs(v) for v in values if math.isfinite(v)]
    peak = max(finite, default=0.0)
    if unit == "s":
        return (1e3, "ms") if peak < 1 else (1.0, "s")
    if unit == "percentunit":
        return 100.0, "%"
    return 1.0, {"reqps": "req/s", "short": "", "bool": "", "ops": "ops/s"}.get(unit, unit)


def fmt_value(value: float, unit: str) -> str:
    factor, label = scale(unit, [value])
    shown = value * factor
    text = f"{shown:.0f}" if abs(shown) >= 100 else f"{shown:.3g}"
    return f"{text} {label}".strip()


def threshold_color(panel: Panel, value: float) -> str:
    """The color Grafana would give ``value``: the last threshold step it reaches (green below all)."""
    color = "green"
    for limit, step_color in panel.thresholds:
        if value >= limit:
            color = step_color
    return {"green": "#2e7d32", "orange": "#ef6c00", "red": "#c62828"}.get(color, color)


Series = list[tuple[str, list[float], list[float]]]  # (legend, times, values)


def fetch(
    api: PrometheusAPI, panel: Panel, start: float, end: float, step: float, rate_interval: str
) -> Series:
    out: Series = []
    for q in panel.queries:
        for s in api.query_range(expand(q.expr, rate_interval), start, end, step):
            ts = [float(t) - end for t, _ in s["values"]]
            vs = [float(v) for _, v in s["values"]]
            out.append((legend(q.legend, s["metric"]), ts, vs))
    return out[:MAX_SERIES]


def draw(ax: Any, panel: Panel, series: Series) -> None:
    ax.set_title(panel.title, fontsize=10, loc="left")
    if not series:
        ax.text(
            0.5,
            0.5,
            panel.no_value,
            ha="center",
            va="center",
            fontsize=12,
            color="grey",
            transform=ax.transAxes,
        )
        ax.set_xticks([])
        ax.set_yticks([])
        return
    if panel.kind == "stat":
        last = [vs[-1] for _, _, vs in series if vs]
        ax.text(
            0.5,
            0.45,
            fmt_value(last[0], panel.unit) if last else panel.no_value,
            ha="center",
            va="center",
            fontsize=20,
            color=threshold_color(panel, last[0]) if last else "grey",
            transform=ax.transAxes,
        )
        ax.set_xticks([])
        ax.set_yticks([])
        return
    factor, label = scale(panel.unit, [v for _, _, vs in series for v in vs])
    for name, ts, vs in series:
        ax.plot([t / 60 for t in ts], [v * factor for v in vs], linewidth=1.2, label=name[:40])
    ax.set_xlabel("minutes ago", fontsize=8)
    ax.set_ylabel(label, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    shown = [v * factor for _, _, vs in series for v in vs if math.isfinite(v)]
    if panel.min == 0 and shown and min(shown) >= 0:
        # Leave room at both ends: lines at exactly 0 or 100% would hide under the frame.
        top = max(shown) * 1.1 or 1.0
        ax.set_ylim(bottom=-0.03 * top, top=top)
    ax.legend(fontsize=6, loc="best", framealpha=0.6)


def layout(panels: list[Panel]) -> list[list[Panel]]:
    """Figure rows: runs of stat panels six to a row, time series three to a row."""
    rows: list[list[Panel]] = []
    for p in panels:
        per_row = STATS_PER_ROW if p.kind == "stat" else COLUMNS
        last = rows[-1] if rows else None
        if last and last[0].kind == p.kind and len(last) < per_row:
            last.append(p)
        else:
            rows.append([p])
    return rows


def render_dashboard(
    api: PrometheusAPI,
    dashboard: Dashboard,
    out: Path,
    seconds: float = 900.0,
    step: float = 5.0,
    rate_interval: str = "1m",
    clock: Callable[[], float] = time.time,
) -> Path:
    """Query every panel over the last ``seconds`` and write the grid to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = clock()
    rows = layout(list(dashboard.panels()))
    heights = [STAT_HEIGHT if r[0].kind == "stat" else SERIES_HEIGHT for r in rows]
    fig = plt.figure(figsize=(18, sum(heights) + 0.6))
    grid = fig.add_gridspec(len(rows), STATS_PER_ROW, height_ratios=heights)
    for i, row in enumerate(rows):
        span = 1 if row[0].kind == "stat" else STATS_PER_ROW // COLUMNS
        for j, panel in enumerate(row):
            ax = fig.add_subplot(grid[i, j * span : (j + 1) * span])
            draw(ax, panel, fetch(api, panel, end - seconds, end, step, rate_interval))
    fig.suptitle(dashboard.title, fontsize=14, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.99))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
