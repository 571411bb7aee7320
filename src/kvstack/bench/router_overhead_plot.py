"""The router-overhead benchmark's figure (``kvstack bench router-overhead``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvstack.bench.report import save_figure


def plot_overhead(
    path: Path,
    direct: dict[str, Any],
    rows: list[dict[str, Any]],
    verdicts: list[dict[str, Any]],
    goals: dict[str, float],
) -> None:
    """Added latency per backend, closed-loop throughput, and RSS over the soak, against ``goals``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v["backend"] for v in verdicts]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(12, 3.6))
    xs = range(len(names))
    ax1.bar([x - 0.2 for x in xs], [v["added_p50_ms"] for v in verdicts], 0.4, label="added p50")
    ax1.bar([x + 0.2 for x in xs], [v["added_p99_ms"] for v in verdicts], 0.4, label="added p99")
    ax1.axhline(goals["added_p50_ms"], color="tab:blue", linestyle="--", linewidth=1)
    ax1.axhline(goals["added_p99_ms"], color="tab:orange", linestyle="--", linewidth=1)
    ax1.set_xticks(list(xs), names)
    ax1.set_yscale("symlog", linthresh=1.0)  # a saturated backend adds seconds, a good one < 1 ms
    ax1.set_ylabel("ms over direct (open loop)")
    ax1.legend(fontsize=7)
    ax2.bar([x - 0.2 for x in xs], [v["rps_nonstream"] for v in verdicts], 0.4, label="non-streaming")
    ax2.bar([x + 0.2 for x in xs], [v["rps_stream"] for v in verdicts], 0.4, label="streaming, 32 tokens")
    ax2.axhline(goals["rps_nonstream"], color="tab:blue", linestyle="--", linewidth=1)
    ax2.axhline(goals["rps_stream"], color="tab:orange", linestyle="--", linewidth=1)
    for key, style in (("closed_nonstream", ":"), ("closed_stream", "-.")):
        if direct.get(key):
            ax2.axhline(direct[key]["rps"], color="grey", linestyle=style, linewidth=1)
    ax2.set_xticks(list(xs), names)
    ax2.set_ylabel("req/s, closed loop (grey: direct)")
    ax2.legend(fontsize=7)
    for row in rows:
        rss = row.get("soak", {}).get("rss_mb", [])
        if rss:
            ax3.plot([t for t, _ in rss], [m for _, m in rss], marker=".", label=row["backend"])
    ax3.set_xlabel("soak seconds")
    ax3.set_ylabel("router RSS (MB)")
    ax3.set_ylim(bottom=0)
    ax3.legend(fontsize=7)
    fig.suptitle("One router process in front of simulators (2 shared cores)", fontsize=10)
    save_figure(fig, path)
