"""The chart README's day-one walkthrough, run as written on a real Kubernetes API server.

The values, the ``helm install`` line and ``stream.py`` are read out of ``helm/kvstack/README.md``, so
the page and this test cannot drift apart. What the test control plane changes (it is a real
kube-apiserver, with kwok nodes and pods run as local processes):

- kube-prometheus-stack (step 1) is stood in for by what the chart needs of it: the
  monitoring.coreos.com CRDs (so the ServiceMonitor, PodMonitors and PrometheusRule are accepted),
  the ``monitoring`` namespace (for the Grafana dashboard ConfigMaps), and a real Prometheus whose
  Kubernetes pod discovery scrapes the same ports and paths the chart's monitors name, as the
  Prometheus Operator would configure it;
- the release goes into a fresh namespace instead of ``demo`` (``-n``; ``--create-namespace`` dropped);
- engine pods run their rendered ``kvstack engine sim`` command, and the router its rendered config,
  as local processes on the pods' IPs, as in ``test_cluster_simulator.py``;
- ``kubectl port-forward`` needs a kubelet, so ``OPENAI_BASE_URL`` points at the router's Service
  endpoint (the pod IP and port the Service resolves to) instead of the forwarded port.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.helm.conftest import CHART
from tests.helm.test_cluster_install import get, helm, running_pods
from tests.helm.test_cluster_simulator import chart_router, engine_pod_simulators

from kvstack.common.procs import free_port, running
from kvstack.common.waits import wait_until
from kvstack.dashboards.catalog import dashboards
from kvstack.dashboards.promql import expand
from kvstack.observability.prometheus import PodJob, PrometheusAPI, prometheus_process, prometheus_url
from kvstack_testing import Cluster
from kvstack_testing.kube_access import prometheus_access

README = CHART / "README.md"
ROOT = CHART.parents[1]
RELEASE = "demo"
MONITORING = "monitoring"
MONITOR_KINDS = (
    ("ServiceMonitor", "servicemonitors"),
    ("PodMonitor", "podmonitors"),
    ("PrometheusRule", "prometheusrules"),
)


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block of a Markdown text, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.M | re.S)]


def readme_block(language: str, first_line: str) -> str:
    """The one ``language`` block of the README whose first line starts with ``first_line``."""
    found = [
        b for lang, b in fenced_blocks(README.read_text()) if lang == language and b.startswith(first_line)
    ]
    assert len(found) == 1, f"README.md: expected one {language} block starting {first_line!r}"
    return found[0]


def readme_command(prefix: str) -> list[str]:
    """The README's shell command line starting with ``prefix``, split as the shell would."""
    lines = [
        line for lang, b in fenced_blocks(README.read_text()) if lang == "bash" for line in b.splitlines()
    ]
    found = [shlex.split(line) for line in lines if line.startswith(prefix)]
    assert len(found) == 1, f"README.md: expected one command line starting {prefix!r}"
    return found[0]


def test_the_readme_blocks_are_what_the_walkthrough_runs() -> None:
    """Offline: the README parses into the values, install line and script the cluster test runs."""
    values = yaml.safe_load(readme_block("yaml", "# day-one.yaml"))
    assert values["engines"]["simulator"]["enabled"] is True
    assert values["monitoring"]["grafanaDashboards"]["namespace"] == MONITORING
    install = readme_command("helm install demo ")
    assert install[3:] == ["helm/kvstack", "-n", "demo", "--create-namespace", "-f", "day-one.yaml", "--wait"]
    script = readme_block("python", "# stream.py")
    compile(script, "stream.py", "exec")
    assert "stream=True" in script
    (model,) = values["engines"]["models"][0]["servedModelNames"]
    assert f'model="{model}"' in script
    forward = readme_command("kubectl -n demo port-forward svc/demo-kvstack-router ")
    assert forward[-1] == f"8000:{80}"


CRD_TEMPLATE = """apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: {plural}.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {{kind: {kind}, plural: {plural}, singular: {singular}, listKind: {kind}List}}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}
"""


@pytest.fixture
def prometheus_operator_api(cluster: Cluster) -> Iterator[None]:
    """What kube-prometheus-stack puts in the cluster for this chart: the monitoring CRDs and namespace.
    Only what this fixture created is removed afterwards."""
    created_crds = []
    for kind, plural in MONITOR_KINDS:
        name = f"{plural}.monitoring.coreos.com"
        if cluster.kubectl("get", "crd", name, check=False).returncode != 0:
            crd = CRD_TEMPLATE.format(kind=kind, plural=plural, singular=kind.lower())
            cluster.kubectl("apply", "-f", "-", input=crd)
            created_crds.append(name)
    for name in created_crds:
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    created_ns = cluster.kubectl("get", "namespace", MONITORING, check=False).returncode != 0
    if created_ns:
        cluster.kubectl("create", "namespace", MONITORING)
    try:
        yield
    finally:
        if created_ns:
            cluster.kubectl("delete", "namespace", MONITORING, "--wait=false", check=False)
        for name in created_crds:
            cluster.kubectl("delete", "crd", name, "--wait=false", check=False)


def _install(cluster: Cluster, namespace: str, values_file: Path) -> None:
    """The README's ``helm install`` line, with the test's namespace and the chart's absolute path."""
    args = readme_command("helm install demo ")[1:]
    args[args.index("helm/kvstack")] = str(CHART)
    args[args.index("day-one.yaml")] = str(values_file)
    args[args.index("-n") + 1] = namespace
    args.remove("--create-namespace")  # the namespace fixture made it
    helm(cluster, *args, "--timeout", "180s")


def _monitors(cluster: Cluster, namespace: str) -> dict[str, dict[str, Any]]:
    return {
        f"{kind}/{obj['metadata']['name']}": obj
        for kind, plural in MONITOR_KINDS
        for obj in get(cluster, namespace, plural)
    }


def _finite(result: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in result if math.isfinite(float(s["value"][1]))]


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_day_one_walkthrough(
    cluster: Cluster, namespace: str, prometheus_operator_api: None, tmp_path: Path
) -> None:
    # Step 2 and 3: the README's values and install line.
    values_file = tmp_path / "day-one.yaml"
    values_file.write_text(readme_block("yaml", "# day-one.yaml"))
    _install(cluster, namespace, values_file)
    try:
        _walk(cluster, namespace, tmp_path)
    finally:
        # The dashboard ConfigMaps live in `monitoring`, outside the test namespace.
        helm(cluster, "uninstall", RELEASE, "-n", namespace, "--wait")
    assert [
        c for c in get(cluster, MONITORING, "configmaps") if c["metadata"]["name"].startswith("demo-")
    ] == []


def _walk(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    engines = running_pods(cluster, namespace, "engine", 2)
    running_pods(cluster, namespace, "router", 1)

    # The release's monitoring objects, as kube-prometheus-stack's Prometheus would select them.
    monitors = _monitors(cluster, namespace)
    assert set(monitors) == {
        "ServiceMonitor/demo-kvstack-router",
        "PodMonitor/demo-kvstack-engine",
        "PrometheusRule/demo-kvstack",
    }, sorted(monitors)
    assert all(m["metadata"]["labels"]["release"] == "kps" for m in monitors.values())
    (router_ep,) = monitors["ServiceMonitor/demo-kvstack-router"]["spec"]["endpoints"]
    (engine_ep,) = monitors["PodMonitor/demo-kvstack-engine"]["spec"]["podMetricsEndpoints"]
    assert (router_ep["port"], router_ep["path"]) == ("metrics", "/metrics")
    assert (engine_ep["port"], engine_ep["path"]) == ("http", "/metrics")

    # Grafana's sidecar loads exactly the committed dashboards from `monitoring`.
    maps = [
        c
        for c in get(cluster, MONITORING, "configmaps", "grafana_dashboard=1")
        if c["metadata"]["labels"].get("app.kubernetes.io/instance") == RELEASE
    ]
    shipped = {name: json.loads(text) for c in maps for name, text in c["data"].items()}
    committed = {p.name: json.loads(p.read_text()) for p in (ROOT / "dashboards" / "json").glob("*.json")}
    assert shipped == committed
    assert all(c["metadata"]["annotations"]["grafana_folder"] == "kvstack" for c in maps)

    # The pods' processes: simulators from their rendered commands, the router from its ConfigMap.
    sims = engine_pod_simulators(cluster, namespace, RELEASE, engines, tmp_path)
    router, url = chart_router(cluster, namespace, RELEASE, tmp_path)
    access = prometheus_access(cluster, tmp_path / "prometheus-credentials")
    prometheus = prometheus_process(
        tmp_path / "prometheus",
        [],
        free_port(),
        rule_files=[],
        scrape_interval="1s",
        binary=str(cluster.tools.prometheus),
        pod_jobs=[
            PodJob("kvstack-engine", "engine", namespaces=(namespace,), port_name=engine_ep["port"]),
            PodJob("kvstack-router", "router", namespaces=(namespace,), port_name=router_ep["port"]),
        ],
        kube=access,
    )
    try:
        sims.start().wait_for(2)
        router.start().wait_ready(60)
        with running([prometheus]):
            _stream_and_watch(namespace, f"{url}/v1", PrometheusAPI(prometheus_url(prometheus)))
    finally:
        router.stop()
        sims.stop()


def _stream(env: dict[str, str]) -> str:
    """The README's stream.py, run as written; what it printed."""
    script = readme_block("python", "# stream.py")
    answer = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert answer.returncode == 0, answer.stderr
    return answer.stdout


def _stream_and_watch(namespace: str, base_url: str, prom: PrometheusAPI) -> None:
    # Step 4: stream.py with the environment the README exports, "a few times".
    env = {**os.environ, "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "unused"}
    for _ in range(3):
        printed = _stream(env)
        assert len(printed.split()) >= 2, printed

    # Step 5: Prometheus scrapes both engines and the router, and the dashboards' queries have data.
    ns = f'namespace="{namespace}"'
    wait_until(lambda: len(prom.query(f"up{{{ns}}} == 1")) == 3, "2 engines and 1 router scraped", 60, 0.5)
    wait_until(
        lambda: prom.query(
            f'sum(kvstack_router_requests_total{{{ns}, model_name="llama", status="200"}}) >= 3'
        ),
        "the streamed answers counted by the router",
        timeout=60,
        interval=0.5,
    )
    values = {"namespace": namespace, "model": "llama", "pod": ".*"}
    overview = {p.title: p for p in dashboards()["overview"].panels()}

    def live(expr: str) -> list[dict[str, Any]]:
        _stream(env)  # rates need traffic inside their window: the page is watched while in use
        return _finite(prom.query(expand(expr, "15s", values)))

    for title, expected in (("Engines serving", 2.0), ("Router 5xx ratio", 0.0), ("Requests/s", None)):
        (query,) = overview[title].queries
        result = wait_until(partial(live, query.expr), f"Overview {title!r} with data", 90, 0.5)
        if expected is not None:
            # 5xx ratio: traffic without errors reads 0, not "No traffic"
            assert float(result[0]["value"][1]) == expected, (title, result)
