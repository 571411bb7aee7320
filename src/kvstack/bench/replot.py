"""``kvstack bench replot``: draw a benchmark's PNG again from its committed JSON, without re-running it.

Plots get fixed after the numbers are in (an axis that clips a bar, a legend over a bar); the JSON
holds everything each figure shows, so the fix reaches every committed PNG without a new run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

ResultKind = Literal["routing", "soak", "router_overhead", "gpu", "flow"]


class ReplotError(ValueError):
    """A results file no plot is drawn from, or files of different benchmarks given together."""


def kind_of(payload: Mapping[str, Any]) -> ResultKind:
    """Which benchmark wrote ``payload``: by its ``benchmark`` field, else by its shape."""
    named = payload.get("benchmark")
    if named in ("soak", "router_overhead"):
        return named  # type: ignore[no-any-return]
    if "rows" in payload and "setup" in payload:
        return "routing"
    if "cases" in payload and "label" in payload:
        return "gpu"
    if "ramp" in payload and "goals" in payload:
        return "flow"
    raise ReplotError(
        f"not a routing, soak, router-overhead, GPU or flow results file (keys: {', '.join(sorted(payload))})"
    )


def _load(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReplotError(f"{path} is not a JSON results file ({err.__class__.__name__})") from err
    if not isinstance(payload, dict):
        raise ReplotError(f"{path} is not a results file: its JSON is not an object")
    return payload


def default_png(kind: ResultKind, first: Path) -> Path:
    """Where the benchmark itself writes the figure of ``first``."""
    if kind == "routing":
        return first.parent / "routing.png"
    if kind == "gpu":
        return first.parent / "gpu.png"
    if kind == "flow":
        return first.parent / "flow.png"
    return first.with_suffix(".png")


def replot(files: Sequence[Path], png: Path | None = None) -> Path:
    """Draw the figure of ``files`` (one file; several for GPU and flow runs, which share one figure:
    on real engines each call of the device runs one policy)."""
    if not files:
        raise ReplotError("no results file given")
    payloads = [_load(f) for f in files]
    kinds = {kind_of(p) for p in payloads}
    if len(kinds) > 1:
        raise ReplotError(f"files of different benchmarks: {', '.join(sorted(kinds))}")
    kind = kinds.pop()
    if kind not in ("gpu", "flow") and len(files) > 1:
        raise ReplotError(f"one {kind} results file at a time (only GPU and flow runs share a figure)")
    target = png or default_png(kind, files[0])
    payload = payloads[0]
    if kind == "routing":
        from kvstack.bench import routing_goals
        from kvstack.bench.cli import plot_routing

        setup = payload["setup"]
        summary = routing_goals.medians(payload["rows"])
        plot_routing(summary, target, engines=int(setup["engines"]), load=float(setup["load"]))
    elif kind == "soak":
        from kvstack.bench.soak_plot import replot as soak_replot

        soak_replot(files[0], target)
    elif kind == "flow":
        from kvstack.bench.flow import plot as flow_plot
        from kvstack.bench.flow_plan import Results

        ramp = [row for p in payloads for row in p["ramp"]]
        real = all(p.get("meta", {}).get("engines_file") for p in payloads)
        flow_plot(Results(ramp=ramp), target, simulated=not real)
    elif kind == "router_overhead":
        from kvstack.bench.router_overhead_plot import replot as overhead_replot

        overhead_replot(files[0], target)
    else:
        from kvstack.bench.gpu_plot import plot as gpu_plot

        folders = {f.parent for f in files}
        if len(folders) > 1:
            raise ReplotError("GPU runs of one figure must share a folder")
        gpu_plot(folders.pop(), target, labels=[f.stem for f in files])
    return target
