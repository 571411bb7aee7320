"""router.workers: worker processes per router pod, by default from the pod's CPU request."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.helm.conftest import HelmChart
from tests.helm.test_router_config import load_router


@pytest.mark.parametrize(
    ("set_values", "workers"),
    [
        ([], 1),  # the chart's request: 500m
        (["router.resources.requests.cpu=2500m"], 3),  # rounded up
        (["router.resources.requests.cpu=1000m"], 1),
        (["router.resources.requests.cpu=2"], 2),
        (["router.resources.requests.cpu=1.5"], 2),
        (["router.resources.requests.cpu=100m"], 1),  # at least one
        (["router.resources.requests.cpu=4", "router.workers=2"], 2),  # given: kept
        (["router.workers=auto"], 0),  # the router counts the pod's usable cores
    ],
)
def test_workers_reach_the_router(
    set_values: list[str], workers: int, chart: HelmChart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_router(chart.template(set_values=set_values), tmp_path, monkeypatch)
    assert settings.workers == workers


@pytest.mark.parametrize("bad", ["router.workers=0", "router.workers=-1", "router.workers=many"])
def test_the_schema_refuses_bad_workers(bad: str, chart: HelmChart) -> None:
    assert "/router/workers" in chart.template_error(set_values=[bad])
