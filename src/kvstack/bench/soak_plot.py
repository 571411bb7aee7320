"""The soak benchmark's figure (``kvstack bench soak``), and the same figure again from its JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvstack.bench.report import save_figure


def plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """RSS and load per minute; routed latency; added latency around a zero line.

    The added latency is routed minus direct percentiles measured on different requests, so a quiet
    minute can come out slightly negative: it gets a linear axis with a zero line (a symlog axis drew
    such a minute as a -10^0 outlier).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["minute"] for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 3.8))
    rss = [r["rss_mb"] for r in rows if r["rss_mb"] == r["rss_mb"]]
    ax1.plot(xs, [r["rss_mb"] for r in rows], marker=".", label="router RSS")
    ax1.set_xlabel("minute")
    ax1.set_ylabel("router RSS (MB)")
    # From 0 (growth reads as a share of the total) to well above the line, so it never meets the frame.
    ax1.set_ylim(0, max(rss, default=1.0) * 1.6)
    load_axis = ax1.twinx()  # shared cores: latency spikes line up with the machine's load
    load_axis.plot(xs, [r["load_avg_1m"] for r in rows], color="grey", linestyle=":", label="load avg, 1 min")
    load_axis.set_ylabel("load average, 1 min")
    load_axis.set_ylim(0, max((r["load_avg_1m"] for r in rows), default=1.0) * 1.6)
    lines = ax1.get_lines() + load_axis.get_lines()
    ax1.legend(lines, [str(line.get_label()) for line in lines], fontsize=7, loc="upper left")
    for key in ("routed_p50_ms", "routed_p99_ms"):
        ax2.plot(xs, [r[key] for r in rows], "-", marker=".", label=key.removesuffix("_ms"))
    ax2.set_xlabel("minute")
    ax2.set_ylabel("routed latency (ms)")
    ax2.set_ylim(0, max((r["routed_p99_ms"] for r in rows), default=1.0) * 1.3)
    ax2.legend(fontsize=7, loc="upper left")
    for key in ("added_p50_ms", "added_p99_ms"):
        ax3.plot(xs, [r[key] for r in rows], "--", marker=".", label=key.removesuffix("_ms"))
    ax3.axhline(0, color="black", linewidth=0.8)
    ax3.set_xlabel("minute")
    ax3.set_ylabel("added (ms): routed - direct")
    ax3.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def replot(json_path: Path, png: Path | None = None) -> Path:
    """The PNG of a committed ``soak-LABEL.json`` again (beside it unless ``png`` is given)."""
    payload = json.loads(json_path.read_text())
    label = json_path.stem.removeprefix("soak-")
    target = png or json_path.with_suffix(".png")
    rate = float(payload["params"]["rate"])
    plot(target, payload["minutes"], f"kvstack router soak, {label} at {rate:g} req/s ({payload['run']})")
    return target
