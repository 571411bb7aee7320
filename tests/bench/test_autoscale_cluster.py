"""``kvstack bench autoscale --cluster``, briefly: kwok pods, the real operator, Prometheus and router.

A short load step with our default autoscaling (periods shortened): the JSON has the planned shape,
and the fleet grew after the step, with the new pods Ready and serving routed requests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvstack.bench.autoscale_cluster import ClusterBench, run, write
from kvstack.bench.autoscale_plan import Phases, Sample
from kvstack_testing import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]


def test_a_short_load_step_scales_the_engines_up(cluster: Cluster, tmp_path: Path) -> None:
    lines: list[str] = []
    bench = ClusterBench(
        scale=5,
        phases=Phases(warm_s=6, step_s=35, after_s=4, base_rate=0.3, step_rate=4.0),
        only=("kvstack defaults",),
    )
    report = run(cluster, bench, lines.append)
    json_path, png_path = write(tmp_path, report)

    saved = json.loads(json_path.read_text())
    assert png_path.stat().st_size > 10_000
    assert saved["mode"] == "cluster" and saved["scale"] == 5
    (result,) = saved["runs"]
    assert result["name"] == "kvstack defaults"
    assert result["autoscaling"]["intervalSeconds"] == 3
    assert result["operator_exception"] is None
    timeline = result["timeline"]
    assert set(timeline) == set(Sample.__dataclass_fields__)
    assert len({len(v) for v in timeline.values()}) == 1 and len(timeline["t"]) > 20

    summary = result["summary"]
    before = summary["replicas_before"]
    assert before == 1
    # Replicas rose after the step, and the new pods became Ready and then served routed requests.
    after_step = [d for t, d in zip(timeline["t"], timeline["desired"], strict=True) if t >= 0]
    assert max(after_step) > before
    assert summary["decision_s"] is not None and summary["decision_s"] >= 0
    assert summary["ready_s"] is not None and summary["ready_s"] >= summary["decision_s"]
    assert summary["serving_s"] is not None and summary["serving_s"] >= summary["ready_s"]
    assert len(result["requests_per_pod"]) > 1  # more than the one pod before the step answered
    assert summary["requests"] > 0 and summary["errors"] <= summary["requests"] // 10
    # Progress lines were printed while it ran.
    assert any(line.startswith("[kvstack defaults] t=") for line in lines)
