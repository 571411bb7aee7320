"""The chart's operator as the chart cluster tests run it: in-process under KopfRunner, but with the
chart's own operator ServiceAccount, so the chart's Role is what it may do."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kvstack.operator.runtime import Runtime
from kvstack.operator.settings import OperatorSettings
from kvstack_testing import Cluster, PodSimulators

ACCOUNT = "rel-kvstack-operator"  # the operator ServiceAccount of the tests' release "rel"
ENGINE_PODS = "app.kubernetes.io/instance=rel,app.kubernetes.io/component=engine"


def service_account_kubeconfig(cluster: Cluster, namespace: str, account: str, out: Path) -> Path:
    """A kubeconfig that authenticates as ``account`` (a TokenRequest token), nothing more."""
    token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration=3600s").stdout.strip()
    doc = yaml.safe_load(cluster.kubeconfig.read_text())
    context = next(c["context"] for c in doc["contexts"] if c["name"] == cluster.context)
    entry = next(c for c in doc["clusters"] if c["name"] == context["cluster"])
    ca = entry["cluster"].get("certificate-authority")
    if ca and not Path(ca).is_absolute():
        entry["cluster"]["certificate-authority"] = str(cluster.kubeconfig.parent / ca)
    out.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [entry],
                "users": [{"name": account, "user": {"token": token}}],
                "contexts": [{"name": account, "context": {"cluster": entry["name"], "user": account}}],
                "current-context": account,
            }
        )
    )
    return out


def chart_operator(
    cluster: Cluster, namespace: str, workdir: Path, monkeypatch: pytest.MonkeyPatch, prometheus_url: str
) -> tuple[Runtime, PodSimulators]:
    """The operator's runtime as the release's ServiceAccount (its kubeconfig is also $KUBECONFIG, where
    kopf logs in from), ticking every half second, and simulators for the release's engine pods
    (logs under ``workdir/sims``)."""
    kubeconfig = service_account_kubeconfig(cluster, namespace, ACCOUNT, workdir / "sa.yaml")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    settings = OperatorSettings(
        namespace=namespace,
        kubeconfig=kubeconfig,
        context=ACCOUNT,
        metrics_port=0,
        liveness_port=0,
        tick_seconds=0.5,
        prometheus_url=prometheus_url,
    )
    sims = PodSimulators(cluster.credentials(), ENGINE_PODS, namespace=namespace, log_dir=workdir / "sims")
    return Runtime(settings), sims
