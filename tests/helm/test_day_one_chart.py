"""Chart finishing touches for day one: the router's extra volumes, and NOTES.txt's warning about a
ReadWriteOnce model cache shared by engine replicas that may land on different nodes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.helm.conftest import CHART, HelmChart, Validate, render_notes

RWO_WARNING = "WARNING: model llama-8b runs up to"


def _values(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture
def notes_chart(helm_bin: Path, tmp_path: Path) -> HelmChart:
    path = tmp_path / "kvstack"
    shutil.copytree(CHART, path)
    return HelmChart(helm_bin, path)


def test_router_extra_volumes_and_mounts(chart: HelmChart, tmp_path: Path, kubeconform: Validate) -> None:
    values = {
        "router": {
            "extraVolumes": [{"name": "ca-bundle", "configMap": {"name": "corporate-ca"}}],
            "extraVolumeMounts": [{"name": "ca-bundle", "mountPath": "/etc/ssl/corporate", "readOnly": True}],
        }
    }
    rendered = chart.template([_values(tmp_path, values)])
    spec = rendered.one("Deployment", "-router")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["ca-bundle"] == {"name": "ca-bundle", "configMap": {"name": "corporate-ca"}}
    assert {"config", "tmp"} <= set(volumes)  # the chart's own stay
    mounts = spec["containers"][0]["volumeMounts"]
    assert {"name": "ca-bundle", "mountPath": "/etc/ssl/corporate", "readOnly": True} in mounts
    assert [m["mountPath"] for m in mounts][:2] == ["/etc/kvstack", "/tmp"]
    assert kubeconform(rendered.text).returncode == 0


def test_router_without_extra_volumes_renders_only_the_charts(chart: HelmChart) -> None:
    spec = chart.template().one("Deployment", "-router")["spec"]["template"]["spec"]
    assert [v["name"] for v in spec["volumes"]] == ["config", "tmp"]
    assert [m["name"] for m in spec["containers"][0]["volumeMounts"]] == ["config", "tmp"]


@pytest.mark.parametrize("name", ["config", "tmp", "tokenizers"])
def test_a_router_extra_volume_may_not_take_a_chart_volume_name(
    chart: HelmChart, tmp_path: Path, name: str
) -> None:
    error = chart.template_error(
        [_values(tmp_path, {"router": {"extraVolumes": [{"name": name, "emptyDir": {}}]}})]
    )
    assert "/router/extraVolumes/0" in error


def test_a_router_extra_mount_needs_a_path(chart: HelmChart, tmp_path: Path) -> None:
    error = chart.template_error([_values(tmp_path, {"router": {"extraVolumeMounts": [{"name": "x"}]}})])
    assert "/router/extraVolumeMounts/0" in error and "mountPath" in error


CACHE_ON = "engines.defaults.modelCache.enabled=true"


@pytest.mark.parametrize(
    ("set_values", "warned"),
    [
        # two replicas on one ReadWriteOnce claim: the second pod may land on another node
        ((CACHE_ON, "engines.defaults.replicas=2"), True),
        # the operator may scale to maxReplicas (4 by default)
        ((CACHE_ON, "engines.autoscaling.enabled=true", "operator.enabled=true"), True),
        # one replica, or at most one under autoscaling: nothing to share
        ((CACHE_ON,), False),
        (
            (
                CACHE_ON,
                "engines.autoscaling.enabled=true",
                "operator.enabled=true",
                "engines.defaults.autoscaling.maxReplicas=1",
            ),
            False,
        ),
        # a claim every node can mount
        (
            (
                CACHE_ON,
                "engines.defaults.replicas=2",
                "engines.defaults.modelCache.accessModes={ReadWriteMany}",
            ),
            False,
        ),
        # the user's own claim: the chart does not know its access mode
        (
            (CACHE_ON, "engines.defaults.replicas=2", "engines.defaults.modelCache.existingClaim=weights"),
            False,
        ),
        # no claim at all (emptyDir per pod)
        (("engines.defaults.replicas=2",), False),
    ],
    ids=[
        "rwo-2-replicas",
        "rwo-autoscaled",
        "rwo-1-replica",
        "rwo-max-1",
        "rwx",
        "existing-claim",
        "no-cache",
    ],
)
def test_notes_warn_about_a_read_write_once_cache_shared_by_replicas(
    notes_chart: HelmChart, set_values: tuple[str, ...], warned: bool
) -> None:
    notes = render_notes(notes_chart, *set_values)
    assert (RWO_WARNING in notes) is warned, notes
    if warned:
        assert "rel-kvstack-engine-llama-8b-models" in notes
        assert "ReadWriteMany" in notes


def test_notes_in_simulator_mode_point_to_the_walkthrough(notes_chart: HelmChart) -> None:
    gpu = render_notes(notes_chart)
    sim = render_notes(notes_chart, "engines.simulator.enabled=true")
    assert "take minutes to download and load weights" in gpu and "helm/kvstack/README.md" not in gpu
    assert "run the CPU simulator" in sim and "helm/kvstack/README.md" in sim
    assert "download and load weights" not in sim
    # the layout stays: a blank line between the release line and the engines paragraph
    assert sim.splitlines()[1] == "" and sim.splitlines()[2].startswith("Engines (1 model(s)) run")
