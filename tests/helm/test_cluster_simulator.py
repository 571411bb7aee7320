"""Simulator mode: with ``engines.simulator.enabled`` the chart serves the openai SDK on a CPU cluster.

kwok pods run no processes, so each engine pod's process is started here, from the pod's own
command and args as the chart rendered them (``kvstack engine sim ...``); only the addresses it binds
change from the pod's 0.0.0.0 to its loopback pod IP (a pod has its own network namespace, these
share one). The router runs with the chart's ConfigMap as in test_cluster_serving.py, and a chat
completion goes through the router's Service endpoint with the openai SDK.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from tests.helm.test_cluster_install import get, release, running_pods
from tests.helm.test_cluster_serving import service_endpoint

from kvstack.common.procs import ManagedProcess
from kvstack_testing import Cluster, PodSimulators
from kvstack_testing.pod_sims import kvstack_executable
from kvstack_testing.pod_targets import SimTarget

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
VALUES = {
    "router": {"replicas": 1},
    "lmcache": {"remote": {"mode": "none"}},
    "engines": {
        "simulator": {"enabled": True},
        "models": [{"name": "llama-8b", "model": MODEL, "replicas": 2, "servedModelNames": ["llama"]}],
    },
}


def pod_commands(pods: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Pod name -> the engine container's command + args, as rendered by the chart."""
    out = {}
    for pod in pods:
        (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "engine"]
        out[pod["metadata"]["name"]] = [*container["command"], *container.get("args", [])]
    return out


def as_pod(argv: list[str], target: SimTarget) -> list[str]:
    """The pod's own argv, bound to its pod IP instead of every address (and run from this venv)."""
    assert argv[:3] == ["kvstack", "engine", "sim"], argv
    args = [
        target.host if a == "0.0.0.0" else a.replace("tcp://*:", f"tcp://{target.host}:") for a in argv[3:]
    ]
    return [kvstack_executable(), "engine", "sim", *args]


def engine_pod_simulators(
    cluster: Cluster, namespace: str, release_name: str, engines: list[dict[str, Any]], workdir: Path
) -> PodSimulators:
    """A simulator for each of the release's engine pods, run from the pod's own command (see
    :func:`as_pod`); logs under ``workdir/sims``."""
    commands = pod_commands(engines)
    return PodSimulators(
        cluster.credentials(),
        f"app.kubernetes.io/instance={release_name},app.kubernetes.io/component=engine",
        namespace=namespace,
        command=lambda target: as_pod(commands[target.name], target),
        log_dir=workdir / "sims",
    )


def chart_router(
    cluster: Cluster, namespace: str, release_name: str, workdir: Path
) -> tuple[ManagedProcess, str]:
    """The release's router as its pod runs it, from its ConfigMap, on its Service's address (reaching
    the API server with the test cluster's kubeconfig); and its base URL."""
    name = f"{release_name}-kvstack-router"
    ip, port = service_endpoint(cluster, namespace, name)
    (conf,) = [c for c in get(cluster, namespace, "configmaps") if c["metadata"]["name"] == name]
    config: dict[str, Any] = yaml.safe_load(conf["data"]["router.yaml"])
    config["host"] = ip
    config["kubernetes"] |= {"kubeconfig": str(cluster.kubeconfig), "context": cluster.context}
    config_file = workdir / "router.yaml"
    config_file.write_text(yaml.safe_dump(config))
    argv = [kvstack_executable(), "router", "--config", str(config_file)]
    url = f"http://{ip}:{port}"
    return ManagedProcess("router", argv, workdir, ready_url=f"{url}/ready"), url


def test_simulator_mode_serves_the_openai_sdk(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(VALUES))
    release(cluster, "install", namespace, "-f", str(values))
    engines = running_pods(cluster, namespace, "engine", 2)
    running_pods(cluster, namespace, "router", 1)
    assert "nvidia.com/gpu" not in yaml.safe_dump(engines)
    for argv in pod_commands(engines).values():
        assert argv[:3] == ["kvstack", "engine", "sim"]
    sims = engine_pod_simulators(cluster, namespace, "rel", engines, tmp_path)
    router, url = chart_router(cluster, namespace, "rel", tmp_path)
    try:
        sims.start().wait_for(2)
        router.start().wait_ready(60)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["llama"]
        reply = client.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "Say hello."}], max_tokens=16
        )
        assert reply.choices[0].message.content
        assert reply.model == "llama"
    finally:
        router.stop()
        sims.stop()
