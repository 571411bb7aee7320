"""After `helm install`, a client reaches the router through its Service and gets answers.

kwok pods run no processes, so the harness plays them: ``PodSimulators`` serves each engine pod on
its loopback IP, and a real ``kvstack router`` runs with the chart's own ConfigMap on the router
pod's endpoint (the IP and port the Service resolves to), finding the engines through the
Kubernetes API exactly as it would in the pod. Only the credentials differ: a kubeconfig, not a
service-account token. The user sees: `/v1/models` lists the chart's model, and a chat completion
sent with the openai SDK to the Service's endpoint gets an answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from tests.helm.test_cluster_install import get, release, running_pods

from kvstack.common.procs import ManagedProcess, free_port
from kvstack.common.waits import wait_until
from kvstack_testing import Cluster, PodSimulators
from kvstack_testing.pod_sims import kvstack_executable

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
VALUES = {
    "router": {"replicas": 1},
    "lmcache": {"remote": {"mode": "none"}},  # no Redis: nothing here needs shared KV
    "engines": {
        "models": [
            {
                "name": "llama-8b",
                "model": MODEL,
                "replicas": 2,
                # The simulators serve the model the chart deploys (the pods' args only name a config file).
                "podAnnotations": {"sim.kvstack.io/model": MODEL},
            }
        ]
    },
}


def service_endpoint(cluster: Cluster, namespace: str, name: str) -> tuple[str, int]:
    """(IP, port) of the one ready endpoint of Service ``name``, resolved as the EndpointSlice
    controller does: its selector picks Ready pods, its named targetPort picks their container port.
    (The controller computes the same here but the API server refuses loopback addresses in
    EndpointSlices, and kwok's pod IPs are loopback, so the slice itself stays empty.)
    """
    (svc,) = [s for s in get(cluster, namespace, "services") if s["metadata"]["name"] == name]
    selector = ",".join(f"{k}={v}" for k, v in svc["spec"]["selector"].items())
    (target,) = [p["targetPort"] for p in svc["spec"]["ports"] if p["name"] == "http"]

    def ready(pod: dict[str, Any]) -> bool:
        return any(
            c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])
        )

    (pod,) = wait_until(
        lambda: [p for p in get(cluster, namespace, "pods", selector) if ready(p)], name, timeout=120
    )
    ports = [p for c in pod["spec"]["containers"] for p in c.get("ports", []) if p.get("name") == target]
    return str(pod["status"]["podIP"]), int(ports[0]["containerPort"])


def test_router_answers_through_its_service_endpoint(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(VALUES))
    release(cluster, "install", namespace, "-f", str(values))
    running_pods(cluster, namespace, "engine", 2)
    running_pods(cluster, namespace, "router", 1)
    ip, port = service_endpoint(cluster, namespace, "rel-kvstack-router")

    (conf,) = [
        c for c in get(cluster, namespace, "configmaps") if c["metadata"]["name"] == "rel-kvstack-router"
    ]
    config: dict[str, Any] = yaml.safe_load(conf["data"]["router.yaml"])
    assert config["port"] == port  # the chart's Service targets the port the router listens on
    # Bind the pod's own IP rather than 0.0.0.0; reach the API server with the test cluster's kubeconfig.
    config["host"] = ip
    assert config["metrics_port"] == 9464  # the chart's; a free one here, beside other tests' servers
    config["metrics_port"] = free_port()
    config["kubernetes"] |= {"kubeconfig": str(cluster.kubeconfig), "context": cluster.context}
    config_file = tmp_path / "router.yaml"
    config_file.write_text(yaml.safe_dump(config))

    selector = "app.kubernetes.io/instance=rel,app.kubernetes.io/component=engine"
    sims = PodSimulators(cluster.credentials(), selector, namespace=namespace, log_dir=tmp_path / "sims")
    argv = [kvstack_executable(), "router", "--config", str(config_file)]
    router = ManagedProcess("router", argv, tmp_path, ready_url=f"http://{ip}:{port}/ready")
    try:
        sims.start().wait_for(2)
        router.start().wait_ready(60)
        client = openai.OpenAI(base_url=f"http://{ip}:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == [MODEL]
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16
        )
        assert reply.choices[0].message.content
        # /metrics only on its own port, which the Service names `metrics` (the Ingress uses `http`)
        assert httpx.get(f"http://{ip}:{port}/metrics").status_code == 404
        scraped = httpx.get(f"http://{ip}:{config['metrics_port']}/metrics")
        assert scraped.status_code == 200 and "kvstack_router_requests_total" in scraped.text
    finally:
        router.stop()
        sims.stop()
