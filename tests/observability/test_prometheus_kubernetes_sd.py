"""Prometheus jobs that discover kvstack pods through the Kubernetes API, as a PodMonitor would.

The rendering is pure and tested by table; that Prometheus 3.15 (built with Kubernetes service
discovery, ``cluster/``) loads the result is tested against the real binary; that it finds and
scrapes pods on a live API server is tested by the operator's cluster tests.
"""

from __future__ import annotations

import base64
import re
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kvstack.common.procs import free_port, running
from kvstack.observability.prometheus import (
    KubeAccess,
    PodJob,
    Target,
    pod_sd_job,
    prometheus_process,
    render_config,
)
from kvstack_testing import Cluster
from kvstack_testing.kube_access import kubeconfig_ca, pod_reader_objects, prometheus_access
from kvstack_testing.tools import Toolchain

CA, TOKEN, CERT, KEY, KUBECONFIG = (Path(f"/creds/{n}") for n in ("ca.crt", "token", "c.crt", "c.key", "kc"))
SERVER = "https://127.0.0.1:6443"


@pytest.mark.parametrize(
    ("access", "fields"),
    [
        (KubeAccess(), {}),  # in-cluster: the pod's own service-account token and CA
        (KubeAccess(kubeconfig=KUBECONFIG), {"kubeconfig_file": "/creds/kc"}),
        (
            KubeAccess(api_server=SERVER, ca_file=CA, bearer_token_file=TOKEN),
            {
                "api_server": SERVER,
                "authorization": {"type": "Bearer", "credentials_file": "/creds/token"},
                "tls_config": {"ca_file": "/creds/ca.crt"},
            },
        ),
        (
            KubeAccess(api_server=SERVER, ca_file=CA, cert_file=CERT, key_file=KEY),
            {
                "api_server": SERVER,
                "tls_config": {
                    "ca_file": "/creds/ca.crt",
                    "cert_file": "/creds/c.crt",
                    "key_file": "/creds/c.key",
                },
            },
        ),
        (KubeAccess(api_server="http://127.0.0.1:8080"), {"api_server": "http://127.0.0.1:8080"}),
    ],
)
def test_access_renders_the_sd_connection_keys(access: KubeAccess, fields: dict[str, Any]) -> None:
    assert access.sd_fields() == fields


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kubeconfig": KUBECONFIG, "api_server": SERVER}, "not both"),
        ({"api_server": SERVER, "cert_file": CERT}, "needs its key"),
        ({"api_server": SERVER, "key_file": KEY}, "needs its key"),
        ({"bearer_token_file": TOKEN}, "need an api_server"),
        ({"ca_file": CA}, "need an api_server"),
    ],
)
def test_access_refuses_contradictions(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KubeAccess(**values)


def _relabel(job: dict[str, Any], target: str) -> dict[str, Any]:
    (rule,) = [r for r in job["relabel_configs"] if r.get("target_label") == target]
    return dict(rule)


@pytest.mark.parametrize(
    ("pod_job", "selector", "namespaces", "port", "honor", "model_label"),
    [
        (PodJob("kvstack-engine", "engine"), "app.kubernetes.io/component=engine", None, "http", False, True),
        (
            PodJob("kvstack-engine", "engine", namespaces=("a", "b")),
            "app.kubernetes.io/component=engine",
            {"names": ["a", "b"]},
            "http",
            False,
            True,
        ),
        (
            PodJob("kvstack-router", "router"),
            "app.kubernetes.io/component=router",
            None,
            "http",
            False,
            False,
        ),
        (
            PodJob("kvstack-operator", "operator", port_name="metrics", honor_labels=True),
            "app.kubernetes.io/component=operator",
            None,
            "metrics",
            True,
            False,
        ),
    ],
)
def test_pod_job_selects_labels_and_relabels_like_a_pod_monitor(
    pod_job: PodJob,
    selector: str,
    namespaces: dict[str, Any] | None,
    port: str,
    honor: bool,
    model_label: bool,
) -> None:
    job = pod_sd_job(pod_job, KubeAccess(kubeconfig=KUBECONFIG))
    assert job["job_name"] == pod_job.job
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod"
    assert sd["kubeconfig_file"] == "/creds/kc"
    assert sd["selectors"] == [{"role": "pod", "label": selector}]  # filtered by the API server
    assert sd.get("namespaces") == namespaces
    rules = job["relabel_configs"]
    keep = [r for r in rules if r.get("action") == "keep"]
    assert keep == [
        {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": port, "action": "keep"}
    ]
    assert {
        "source_labels": ["__meta_kubernetes_pod_phase"],
        "regex": "Succeeded|Failed",
        "action": "drop",
    } in rules
    assert _relabel(job, "namespace")["source_labels"] == ["__meta_kubernetes_namespace"]
    assert _relabel(job, "pod")["source_labels"] == ["__meta_kubernetes_pod_name"]
    # The alert rules select targets by kvstack_component, as the chart's monitors set it.
    assert _relabel(job, "kvstack_component")["source_labels"] == [
        "__meta_kubernetes_pod_label_app_kubernetes_io_component"
    ]
    address = _relabel(job, "__address__")
    assert address["source_labels"] == [
        "__meta_kubernetes_pod_ip",
        "__meta_kubernetes_pod_annotation_kvstack_dev_port",
    ]
    has_model = any(r.get("target_label") == "kvstack_model" for r in rules)
    assert has_model is model_label
    assert job.get("honor_labels", False) is honor


@pytest.mark.parametrize(
    ("joined", "rewritten"),
    [
        ("127.1.0.5;9000", "127.1.0.5:9000"),  # the kvstack.dev/port annotation wins
        ("127.1.0.5;", None),  # no annotation: the container port's address stays
        ("127.1.0.5;http", None),  # not a number: ignored, as the router's discovery ignores it
    ],
)
def test_the_port_annotation_rewrites_the_address(joined: str, rewritten: str | None) -> None:
    rule = _relabel(pod_sd_job(PodJob("kvstack-engine", "engine"), KubeAccess()), "__address__")
    # Prometheus anchors relabel regexes and expands $1/$2 as re.sub's \1/\2 here.
    match = re.fullmatch(rule["regex"], joined)
    got = None if match is None else match.expand(rule["replacement"].replace("$", "\\"))
    assert got == rewritten


def test_render_config_appends_pod_jobs_after_static_ones() -> None:
    access = KubeAccess(api_server=SERVER, ca_file=CA, bearer_token_file=TOKEN)
    cfg = render_config(
        [Target("kvstack-operator", "http://127.0.0.1:9100", "operator")],
        [],
        pod_jobs=[PodJob("kvstack-engine", "engine"), PodJob("kvstack-router", "router")],
        kube=access,
    )
    names = [j["job_name"] for j in cfg["scrape_configs"]]
    assert names == ["kvstack-operator", "kvstack-engine", "kvstack-router"]
    for job in cfg["scrape_configs"][1:]:
        assert job["kubernetes_sd_configs"][0]["api_server"] == SERVER


# ------------------------------------------------------------- credentials for the test cluster


def _kubeconfig(cluster: dict[str, Any]) -> dict[str, Any]:
    return {
        "clusters": [{"name": "c", "cluster": {"server": SERVER, **cluster}}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
    }


def test_kubeconfig_ca_reads_inline_data_or_a_relative_file(tmp_path: Path) -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"
    inline = _kubeconfig({"certificate-authority-data": base64.b64encode(pem).decode()})
    assert kubeconfig_ca(inline, "ctx", tmp_path) == pem
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "ca.crt").write_bytes(pem)
    assert kubeconfig_ca(_kubeconfig({"certificate-authority": "pki/ca.crt"}), "ctx", tmp_path) == pem
    with pytest.raises(ValueError, match="no certificate authority"):
        kubeconfig_ca(_kubeconfig({"insecure-skip-tls-verify": True}), "ctx", tmp_path)
    with pytest.raises(ValueError, match="no context"):
        kubeconfig_ca(inline, "other", tmp_path)


def test_prometheus_may_only_read_pods() -> None:
    sa, role, binding = pod_reader_objects()
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
    ]


# ------------------------------------------------------------- the real binary


def test_prometheus_with_kubernetes_sd_loads_the_rendered_jobs(tmp_path: Path) -> None:
    binary = Toolchain.load().prometheus
    if not binary.is_file():
        pytest.skip(f"{binary} is not built yet (cluster/build.sh prometheus)")
    (tmp_path / "token").write_text("unused")
    access = KubeAccess(api_server="https://127.0.0.1:1", bearer_token_file=tmp_path / "token")
    port = free_port()
    proc = prometheus_process(
        tmp_path,
        [],
        port,
        rule_files=[],
        binary=str(binary),
        pod_jobs=[
            PodJob("kvstack-engine", "engine", namespaces=("demo",)),
            PodJob("kvstack-router", "router"),
        ],
        kube=access,
    )
    with running([proc], timeout=60):  # an invalid config makes Prometheus exit at start
        loaded = yaml.safe_load(
            httpx.get(f"http://127.0.0.1:{port}/api/v1/status/config").json()["data"]["yaml"]
        )
    jobs = {j["job_name"]: j for j in loaded["scrape_configs"]}
    assert set(jobs) == {"kvstack-engine", "kvstack-router"}
    sd = jobs["kvstack-engine"]["kubernetes_sd_configs"][0]
    assert sd["api_server"] == "https://127.0.0.1:1"
    assert sd["namespaces"]["names"] == ["demo"]
    assert sd["selectors"] == [{"role": "pod", "label": "app.kubernetes.io/component=engine"}]


@pytest.mark.cluster
def test_the_test_clusters_prometheus_token_reads_pods_and_nothing_else(
    cluster: Cluster, tmp_path: Path
) -> None:
    access = prometheus_access(cluster, tmp_path)
    assert access.bearer_token_file is not None and access.ca_file is not None
    assert access.bearer_token_file.stat().st_mode & 0o077 == 0  # a credential: owner only
    token = access.bearer_token_file.read_text()
    headers = {"Authorization": f"Bearer {token}"}
    tls = ssl.create_default_context(cafile=str(access.ca_file))
    with httpx.Client(base_url=cluster.server, headers=headers, verify=tls) as api:
        assert api.get("/api/v1/pods", params={"limit": 1}).status_code == 200
        assert api.get("/api/v1/namespaces/kube-system/secrets").status_code == 403
        assert api.get("/api/v1/services").status_code == 403
