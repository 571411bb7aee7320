"""The chart's availability alerts fire whatever the release is called.

The chart is rendered under several names (``nameOverride``, ``fullnameOverride``, another release
name); the targets Prometheus would scrape are derived from the rendered PodMonitors and
ServiceMonitor (their selectors, the pods they pick, their relabelings) and every one is fed to
``promtool test rules`` as down, against the rules of the rendered PrometheusRule. A rule that
selects by job name fails this under a renamed release.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.helm.conftest import HelmChart, Rendered

MONITORING = [
    "monitoring.podMonitor.enabled=true",
    "monitoring.serviceMonitor.enabled=true",
    "monitoring.prometheusRule.enabled=true",
    "redis.metrics.enabled=true",
    "operator.enabled=true",
]
NAMINGS = {
    "default": ("rel", []),
    "name-override": ("rel", ["nameOverride=llm"]),
    "fullname-override": ("rel", ["fullnameOverride=serving"]),
    "other-release": ("prod-ai", ["fullnameOverride=x"]),
}
# Alert -> (component it watches, the metric its test marks down).
DOWN_ALERTS = {
    "KvstackEngineDown": ("engine", "up"),
    "KvstackRouterDown": ("router", "up"),
    "KvstackRedisDown": ("redis", "redis_up"),
}


def _meta(kind: str, key: str) -> str:
    return f"__meta_kubernetes_{kind}_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


def _relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str]:
    """Apply prometheus-operator relabelings (the `replace` action, all the chart uses) to labels."""
    out = dict(labels)
    for rule in rules:
        assert rule.get("action", "replace") == "replace", f"unsupported relabeling in this test: {rule}"
        value = rule.get("separator", ";").join(out.get(s, "") for s in rule.get("sourceLabels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if match is None:
            continue
        replacement = re.sub(r"\$\{?(\d+)\}?", r"\\\1", rule.get("replacement", "$1"))
        result = match.expand(replacement)
        if result:
            out[rule["targetLabel"]] = result
        else:
            out.pop(rule["targetLabel"], None)
    return {k: v for k, v in out.items() if not k.startswith("__")}


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def scrape_targets(rendered: Rendered) -> list[dict[str, str]]:
    """Target labels of one pod of every workload a rendered monitor selects, as Prometheus sets them."""
    workloads = rendered.of_kind("Deployment") + rendered.of_kind("StatefulSet")
    pods = [
        (
            w["metadata"]["name"] + "-0",
            w["metadata"]["namespace"],
            w["spec"]["template"]["metadata"]["labels"],
        )
        for w in workloads
    ]
    targets: list[dict[str, str]] = []
    for monitor in rendered.of_kind("PodMonitor") + rendered.of_kind("ServiceMonitor"):
        ns = monitor["metadata"]["namespace"]
        selector = monitor["spec"]["selector"]["matchLabels"]
        if monitor["kind"] == "PodMonitor":
            jobs = [(f"{ns}/{monitor['metadata']['name']}", selector)]
            endpoints = monitor["spec"]["podMetricsEndpoints"]
        else:  # a ServiceMonitor's job is the Service's name; its pods are the Service's selector's
            services = [s for s in rendered.of_kind("Service") if _selects(selector, s["metadata"]["labels"])]
            jobs = [(s["metadata"]["name"], s["spec"]["selector"]) for s in services]
            endpoints = monitor["spec"]["endpoints"]
        for job, pod_selector in jobs:
            for pod, pod_ns, labels in pods:
                if not _selects(pod_selector, labels):
                    continue
                meta = {_meta("pod_label", k): v for k, v in labels.items()}
                meta |= {"__meta_kubernetes_pod_name": pod, "job": job, "namespace": pod_ns, "pod": pod}
                for endpoint in endpoints:
                    targets.append(_relabel(meta, endpoint.get("relabelings", [])))
    return targets


def _series(labels: dict[str, str]) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def promtool_down_test(rendered: Rendered, work: Path) -> Path:
    """A promtool test file: every scraped target down for 5 minutes, each down-alert firing for it."""
    (rule,) = rendered.of_kind("PrometheusRule")
    (work / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    targets = scrape_targets(rendered)
    series = []
    expected: list[dict[str, Any]] = []
    for alert, (component, metric) in DOWN_ALERTS.items():
        down = [t for t in targets if t.get("kvstack_component") == component]
        assert down, f"no scraped target is a {component}: {targets}"
        series += [{"series": metric + _series(t), "values": "0x6"} for t in down]
        want = [
            {**t, "alertname": alert, "alertstate": "firing", "severity": _severity(rule, alert)}
            for t in down
        ]
        expected.append(
            {
                "expr": f'ALERTS{{alertname="{alert}", alertstate="firing"}}',
                "eval_time": "5m",
                "exp_samples": [{"labels": "ALERTS" + _series(w), "value": 1} for w in want],
            }
        )
    # Redis' own target is up while redis_exporter says Redis is down: only redis_up is 0.
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": expected}],
    }
    path = work / "down.test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    return path


def _severity(rule: dict[str, Any], alert: str) -> str:
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            if r.get("alert") == alert:
                return str(r["labels"]["severity"])
    raise AssertionError(f"{alert} is not in the rendered PrometheusRule")


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian: prometheus)")
    return found


@pytest.mark.parametrize("naming", list(NAMINGS))
def test_down_alerts_fire_under_any_release_name(
    naming: str, chart: HelmChart, promtool: str, tmp_path: Path
) -> None:
    release, overrides = NAMINGS[naming]
    rendered = chart.template(set_values=[*MONITORING, *overrides], release=release)
    test_file = promtool_down_test(rendered, tmp_path)
    proc = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_monitor_sets_the_component_label(chart: HelmChart) -> None:
    rendered = chart.template(set_values=[*MONITORING, "fullnameOverride=serving"])
    components = {t.get("kvstack_component") for t in scrape_targets(rendered)}
    assert components == {"engine", "router", "redis", "operator"}


def test_a_job_name_selector_would_be_caught(chart: HelmChart, promtool: str, tmp_path: Path) -> None:
    # Guards the test: the rules as they once were (a regex on the job name) fail it when renamed.
    rendered = chart.template(set_values=[*MONITORING, "fullnameOverride=serving"], release="rel")
    (rule,) = rendered.of_kind("PrometheusRule")
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            r["expr"] = re.sub(r'kvstack_component="(\w+)"', r'job=~".*kvstack-\1.*"', r["expr"])
    test_file = promtool_down_test(rendered, tmp_path)
    proc = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "KvstackEngineDown" in proc.stdout + proc.stderr
