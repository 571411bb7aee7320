"""Chart pieces that read files: dashboards, alert rules, the operator's CRDs, and NOTES.txt.

The dashboards and CRDs land later from other parts of the project, so these tests render a
copy of the chart with sample files dropped in where they will go.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.helm.conftest import CHART, HelmChart, Validate, render_notes

from kvstack.operator import crd as crd_module

SAMPLE_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "stacks.kvstack.dev"},
    "spec": {
        "group": "kvstack.dev",
        "names": {"kind": "Stack", "plural": "stacks", "singular": "stack"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1alpha1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                },
            }
        ],
    },
}


@pytest.fixture
def chart_copy(helm_bin: Path, tmp_path: Path) -> HelmChart:
    path = tmp_path / "kvstack"
    shutil.copytree(CHART, path)
    # Start from no generated files (dashboards, rules, the operator's CRD), whatever the real chart holds.
    files = path / "files"
    for generated in [
        *files.glob("dashboards/*.json"),
        *files.glob("rules/*.yaml"),
        *files.glob("crds/*.yaml"),
    ]:
        if generated.name != "placeholder.yaml":
            generated.unlink()
    return HelmChart(helm_bin, path)


def test_each_dashboard_becomes_a_labelled_configmap(chart_copy: HelmChart, kubeconform: Validate) -> None:
    dashboards = chart_copy.path / "files" / "dashboards"
    (dashboards / "kvstack_overview.json").write_text(json.dumps({"title": "kvstack overview", "panels": []}))
    (dashboards / "engines.json").write_text(json.dumps({"title": "engines", "panels": []}))
    rendered = chart_copy.template(set_values=["monitoring.grafanaDashboards.enabled=true"])
    maps = {
        m["metadata"]["name"]: m
        for m in rendered.of_kind("ConfigMap")
        if "dashboard" in m["metadata"]["name"]
    }
    assert set(maps) == {"rel-kvstack-dashboard-kvstack-overview", "rel-kvstack-dashboard-engines"}
    overview = maps["rel-kvstack-dashboard-kvstack-overview"]
    assert overview["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert overview["metadata"]["annotations"]["grafana_folder"] == "kvstack"
    assert json.loads(overview["data"]["kvstack_overview.json"])["title"] == "kvstack overview"
    assert kubeconform(rendered.text).returncode == 0
    off = chart_copy.template()
    assert not [m for m in off.of_kind("ConfigMap") if "dashboard" in m["metadata"]["name"]]


def test_the_placeholder_rule_stands_in_until_rules_are_generated(chart_copy: HelmChart) -> None:
    rendered = chart_copy.template(set_values=["monitoring.prometheusRule.enabled=true"])
    assert [g["name"] for g in rendered.one("PrometheusRule")["spec"]["groups"]] == ["kvstack.placeholder"]


def test_generated_rule_files_replace_the_placeholder(chart_copy: HelmChart, kubeconform: Validate) -> None:
    rules = chart_copy.path / "files" / "rules"
    group = {
        "name": "kvstack.engines",
        "rules": [{"record": "kvstack:ttft:p95", "expr": "histogram_quantile(0.95, x)"}],
    }
    (rules / "engines.yaml").write_text(yaml.safe_dump({"groups": [group]}))
    rendered = chart_copy.template(set_values=["monitoring.prometheusRule.enabled=true"])
    assert rendered.one("PrometheusRule")["spec"]["groups"] == [group]
    assert kubeconform(rendered.text).returncode == 0


def test_a_rule_file_without_groups_fails_by_name(chart_copy: HelmChart) -> None:
    (chart_copy.path / "files" / "rules" / "broken.yaml").write_text("rules: []\n")
    error = chart_copy.template_error(set_values=["monitoring.prometheusRule.enabled=true"])
    assert "files/rules/broken.yaml: expected a top-level `groups:` list" in error


@pytest.mark.parametrize(("keep", "annotated"), [("true", True), ("false", False)])
def test_operator_crds_are_templated_and_kept_on_uninstall(
    chart_copy: HelmChart, kubeconform: Validate, keep: str, annotated: bool
) -> None:
    (chart_copy.path / "files" / "crds" / "stacks.yaml").write_text(yaml.safe_dump(SAMPLE_CRD))
    rendered = chart_copy.template(set_values=["operator.enabled=true", f"operator.crds.keep={keep}"])
    crd = rendered.one("CustomResourceDefinition")
    assert (crd["metadata"].get("annotations", {}).get("helm.sh/resource-policy") == "keep") is annotated
    assert crd["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    assert kubeconform(rendered.text).returncode == 0
    assert not chart_copy.template().of_kind("CustomResourceDefinition")  # operator off: no CRDs


def test_the_real_kvstack_crd_comes_from_the_operator(chart: HelmChart, kubeconform: Validate) -> None:
    # A generated file, not a link (Helm warns on links): the chart ships exactly the CRD the operator
    # renders from its models, and `python -m kvstack.operator.crd` rewrites both copies.
    link = CHART / "files" / "crds" / "kvstack.dev_kvstacks.yaml"
    assert not link.is_symlink()
    assert link.read_text() == crd_module.render() == crd_module.CRD_FILE.read_text()
    rendered = chart.template(set_values=["operator.enabled=true"])
    crd = rendered.one("CustomResourceDefinition", "kvstacks.kvstack.dev")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["spec"] == yaml.safe_load(link.read_text())["spec"]
    proc = kubeconform(rendered.text)
    assert proc.returncode == 0, proc.stdout


def test_operator_is_off_by_default(chart: HelmChart) -> None:
    default = chart.template()
    assert not [
        o for o in default.objects if o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    ]
    on = chart.template(set_values=["operator.enabled=true"])
    assert on.one("Deployment", "-operator")["spec"]["replicas"] == 1
    assert on.one("Role", "-operator")["metadata"]["namespace"] == "kvstack"


def test_notes_say_how_to_reach_the_router(chart_copy: HelmChart) -> None:
    notes = render_notes(chart_copy)
    assert "kubectl -n kvstack port-forward svc/rel-kvstack-router 8000:80" in notes
    assert "http://rel-kvstack-router.kvstack.svc:80/v1" in notes
    assert 'OpenAI(base_url="http://127.0.0.1:8000/v1")' in notes
    assert 'model="meta-llama/Llama-3.1-8B-Instruct"' in notes
    assert "WARNING" not in notes


def test_notes_show_where_the_api_key_is_and_warn_about_unscaled_engines(chart_copy: HelmChart) -> None:
    notes = render_notes(chart_copy, "auth.enabled=true", "engines.autoscaling.enabled=true")
    assert "get secret rel-kvstack-secrets -o jsonpath='{.data.api-key}'" in notes
    assert "WARNING: engines.autoscaling.enabled is on but operator.enabled is off" in notes


def test_extra_objects_are_rendered_through_tpl(
    chart: HelmChart, tmp_path: Path, kubeconform: Validate
) -> None:
    values = tmp_path / "values.yaml"
    extra = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "{{ .Release.Name }}-extra"},
            "data": {},
        },
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {{ .Release.Name }}-bot\n",
    ]
    values.write_text(yaml.safe_dump({"extraObjects": extra}))
    rendered = chart.template([values])
    assert rendered.one("ConfigMap", "rel-extra")["data"] == {}
    assert rendered.one("ServiceAccount", "rel-bot")
    assert kubeconform(rendered.text).returncode == 0
