"""The router-overhead benchmark's figure (``kvstack bench router-overhead``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvstack.bench.report import save_figure


def _legend_below(ax: Any, names: list[str]) -> None:
    """The legend under the axes (and their slanted tick labels): bars and lines stay uncovered."""
    below = -0.3 if _tick_style(names) else -0.14
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, below), ncols=2, frameon=False)


def _tick_style(names: list[str]) -> dict[str, Any]:
    """Long backend names (sglang-cache_aware) slant so neighbours do not overprint each other."""
    return {"rotation": 20, "ha": "right"} if max(map(len, names), default=0) > 10 else {}


def replot(json_path: Path, png: Path | None = None) -> Path:
    """The PNG of a committed ``router_overhead.json`` again (beside it unless ``png`` is given)."""
    payload = json.loads(json_path.read_text())
    target = png or json_path.with_suffix(".png")
    plot_overhead(
        target,
        payload["direct"],
        payload["backends"],
        payload["verdicts"],
        payload["goals"],
        cores=payload.get("usable_cpus") or payload.get("cpu_count"),
    )
    return target


def plot_overhead(
    path: Path,
    direct: dict[str, Any],
    rows: list[dict[str, Any]],
    verdicts: list[dict[str, Any]],
    goals: dict[str, float],
    cores: int | None = None,
) -> None:
    """Added latency per backend, closed-loop throughput, and RSS over the soak, against ``goals``;
    ``cores``: the host's usable CPUs (the title says how many the run shared)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v["backend"] for v in verdicts]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(12, 4.4))
    xs = range(len(names))
    ax1.bar([x - 0.2 for x in xs], [v["added_p50_ms"] for v in verdicts], 0.4, label="added p50")
    ax1.bar([x + 0.2 for x in xs], [v["added_p99_ms"] for v in verdicts], 0.4, label="added p99")
    ax1.axhline(
        goals["added_p50_ms"],
        color="tab:blue",
        linestyle="--",
        linewidth=1,
        label=f"goal: p50 <= {goals['added_p50_ms']:g} ms",
    )
    ax1.axhline(
        goals["added_p99_ms"],
        color="tab:orange",
        linestyle="--",
        linewidth=1,
        label=f"goal: p99 <= {goals['added_p99_ms']:g} ms",
    )
    ax1.set_xticks(list(xs), names, **_tick_style(names))
    ax1.set_yscale("symlog", linthresh=1.0)  # a saturated backend adds seconds, a good one < 1 ms
    added = [v[k] for v in verdicts for k in ("added_p50_ms", "added_p99_ms")]
    ax1.set_ylim(min(0.0, *added), max(goals["added_p99_ms"], *added) * 3)  # the tallest bar clears the frame
    ax1.set_ylabel("ms over direct (open loop)")
    _legend_below(ax1, names)
    ax2.bar([x - 0.2 for x in xs], [v["rps_nonstream"] for v in verdicts], 0.4, label="non-streaming")
    ax2.bar([x + 0.2 for x in xs], [v["rps_stream"] for v in verdicts], 0.4, label="streaming, 32 tokens")
    ax2.axhline(
        goals["rps_nonstream"],
        color="tab:blue",
        linestyle="--",
        linewidth=1,
        label=f"goal: >= {goals['rps_nonstream']:g} req/s",
    )
    ax2.axhline(
        goals["rps_stream"],
        color="tab:orange",
        linestyle="--",
        linewidth=1,
        label=f"goal: >= {goals['rps_stream']:g} streamed req/s",
    )
    for key, style, what in (
        ("closed_nonstream", ":", "non-streaming"),
        ("closed_stream", "-.", "streaming"),
    ):
        if direct.get(key):
            ax2.axhline(
                direct[key]["rps"], color="grey", linestyle=style, linewidth=1, label=f"direct, {what}"
            )
    ax2.set_xticks(list(xs), names, **_tick_style(names))
    ax2.set_ylabel("req/s, closed loop")
    _legend_below(ax2, names)
    soaks = [(row["backend"], row.get("soak", {}).get("rss_mb", [])) for row in rows]
    soaks = [(backend, rss) for backend, rss in soaks if rss]
    for backend, rss in soaks:
        ax3.plot([t for t, _ in rss], [m for _, m in rss], marker=".", label=backend)
    ax3.set_xlabel("soak seconds")
    ax3.set_ylabel("router RSS (MB)")
    if soaks:
        ax3.set_ylim(0, max(m for _, rss in soaks for _, m in rss) * 1.3)
        ax3.legend(fontsize=7, loc="upper left")  # RSS starts low: the corner above it stays empty
    else:
        ax3.text(0.5, 0.5, "no soak in this run", ha="center", va="center", transform=ax3.transAxes)
    host = f"{cores} cores" if cores else "the cores"
    fig.suptitle(f"The router in front of simulators ({host} shared with them and the load)", fontsize=10)
    save_figure(fig, path)
