"""Flow control's three queue orders side by side: goodput and admitted TTFT p99 against offered
load, from `kvstack bench flow --ordering X --label order-X[-rN]` results (one file per run).

    .venv/bin/python scripts/plot_flow_orderings.py bench-results/flow/orderings-s32 [--out F.png]

Prints a table (every run, every load) and writes the plot beside the results.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ORDERS = ("fcfs", "edf", "cheapest")


def load(folder: Path) -> dict[str, list[dict[str, float]]]:
    """Per ordering, one row per (run, load): goodput, 429 share, admitted TTFT percentiles."""
    rows: dict[str, list[dict[str, float]]] = defaultdict(list)
    for path in sorted(folder.glob("order-*.json")):
        body = json.loads(path.read_text())
        ordering = body["meta"]["ordering"]
        for case in body["ramp"]:
            rows[ordering].append(
                {
                    "load": case["offered_rps"] / body["meta"]["capacity_rps"],
                    "goodput": case["goodput_rps"],
                    "shed": case["shed_rate"],
                    "p50": case["ttft_p50_s"],
                    "p90": case["ttft_p90_s"],
                    "p99": case["ttft_p99_s"],
                    "errors": case["errors"] + case["lost"],
                }
            )
    return rows


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = load(args.folder)
    print("| ordering | load | goodput (req/s) | 429 | admitted TTFT p50 / p90 / p99 (s) | errors + lost |")
    print("|---|---|---|---|---|---|")
    for ordering in ORDERS:
        for r in sorted(rows.get(ordering, []), key=lambda r: r["load"]):
            print(
                f"| {ordering} | {r['load']:g}x | {r['goodput']:.2f} | {r['shed']:.0%} | "
                f"{r['p50']:.2f} / {r['p90']:.2f} / {r['p99']:.2f} | {r['errors']:g} |"
            )
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for shift, ordering in zip((-0.03, 0.0, 0.03), ORDERS, strict=True):
        found = rows.get(ordering, [])
        if not found:
            continue
        xs = [r["load"] + shift for r in found]  # side by side: equal values would hide each other
        left.scatter(xs, [r["goodput"] for r in found], label=ordering)
        right.scatter(xs, [r["p99"] for r in found], label=ordering)
    left.set(xlabel="offered load (x capacity)", ylabel="goodput: req/s with TTFT <= 1 s (simulated)")
    right.set(xlabel="offered load (x capacity)", ylabel="admitted TTFT p99 (s, simulated)")
    right.axhline(1.0, color="grey", linewidth=0.8)
    for ax in (left, right):
        ax.legend()
    fig.suptitle("flow control's queue order, cache_aware + flow, each dot one run")
    fig.tight_layout()
    out = args.out or args.folder / "orderings.png"
    fig.savefig(out, dpi=100)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
