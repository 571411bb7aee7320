"""The autoscaling benchmark: deterministic runs of the real decision function over a load step."""

from __future__ import annotations

import json
from pathlib import Path

from kvstack.operator.bench import Fleet, write


def test_benchmark_writes_json_and_png_and_ranks_the_policies(tmp_path: Path) -> None:
    runs = {r.name: r for r in write(tmp_path, Fleet())}
    report = json.loads((tmp_path / "autoscale.json").read_text())
    assert [r["name"] for r in report["runs"]] == list(runs)
    assert (tmp_path / "autoscale.png").stat().st_size > 10_000
    ours = runs["kvstack defaults"]
    plain = runs["HPA formula only (no demand floor)"]
    cautious = runs["one pod per minute (KEDA-operator style)"]
    # Reacts at the first evaluation after the step; one up-then-down reversal for one load pulse.
    assert ours.reaction_s is not None and ours.reaction_s <= Fleet().interval_s
    assert ours.reversals <= 1 < plain.reversals
    # Reaching the needed capacity is bounded by the model load, not by a step limit.
    assert ours.capacity_s is not None and cautious.capacity_s is not None
    assert ours.capacity_s < cautious.capacity_s
    assert ours.above_target_s < cautious.above_target_s
