"""End to end: ``helm install`` with a LoRA adapter, ``helm upgrade`` with a second one, and the operator
loads them on the simulators behind the chart's engine pods, reporting on the Deployment.

The operator runs under KopfRunner with the chart's own operator ServiceAccount, so the chart's Role
is what it may do; kwok plays the kubelet and ``PodSimulators`` serves each engine pod on its IP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.helm.test_cluster_install import release

from kvstack.common.procs import free_port
from kvstack.common.waits import wait_until
from kvstack.operator.lora_annotated import LORA, LORA_STATUS
from kvstack_testing import Cluster, operator_runner

from .chart_operator import chart_operator
from .conftest import Api

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "sim-llama"
ENGINE = "rel-kvstack-engine-llama"
SQL = {"name": "sql", "source": "kvstack/sql-lora", "pinned": True}
CHAT = {"name": "chat", "source": "kvstack/chat-lora"}


def values(adapters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "router": {"enabled": False},
        "lmcache": {"remote": {"mode": "none"}},
        "operator": {"enabled": True, "crds": {"enabled": False}},
        "engines": {
            "autoscaling": {"enabled": False, "intervalSeconds": 1},
            "models": [
                {
                    "name": "llama",
                    "model": MODEL,
                    "replicas": 2,
                    "podAnnotations": {
                        "sim.kvstack.io/model": MODEL,
                        "sim.kvstack.io/args": "--enable-lora --max-loras 2",
                    },
                    "lora": {"enabled": True, "maxLoras": 2, "adapters": adapters},
                }
            ],
        },
    }


def lora_status(api: Api) -> dict[str, dict[str, Any]]:
    dep = api.deployment(ENGINE)
    assert dep is not None
    raw = (dep["metadata"].get("annotations") or {}).get(LORA_STATUS)
    return {e["name"]: e for e in json.loads(raw)} if raw else {}


def test_helm_install_then_upgrade_loads_the_declared_adapters(
    cluster: Cluster, namespace: str, api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values([SQL])))
    release(cluster, "install", namespace, "-f", str(path))
    dep = api.deployment(ENGINE)
    assert (
        dep is not None and json.loads(dep["metadata"]["annotations"][LORA])["adapters"][0]["name"] == "sql"
    )

    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")  # the simulators inherit it
    unreachable = f"http://127.0.0.1:{free_port()}"  # no Prometheus: rates unknown, placements hold
    runtime, sims = chart_operator(cluster, namespace, tmp_path, monkeypatch, unreachable)
    with sims, operator_runner(runtime, namespace) as runner:
        sims.wait_for(2, timeout=90)
        # 1. Installed: the pinned adapter on both engines, reported on the Deployment.
        status = wait_until(
            lambda: (s := lora_status(api)).get("sql", {}).get("loaded") == 2 and s,
            "sql loaded on both engines",
            timeout=90,
        )
        assert status["sql"]["desired"] == 2 and status["sql"]["reason"] == "pinned"
        wait_until(
            lambda: any(e["reason"] == "AdapterLoaded" for e in api.events(ENGINE)), "an AdapterLoaded Event"
        )

        # 2. helm upgrade with a second adapter: loaded on a free slot, without restarting the engines.
        pods_before = {t.name for t in sims.targets.values()}
        path.write_text(yaml.safe_dump(values([SQL, CHAT])))
        release(cluster, "upgrade", namespace, "-f", str(path))
        status = wait_until(
            lambda: (s := lora_status(api)).get("chat", {}).get("loaded") == 1 and s,
            "chat loaded after the upgrade",
            timeout=90,
        )
        assert status["sql"]["loaded"] == 2
        assert {t.name for t in sims.targets.values()} == pods_before
    assert runner.exception is None, runner.output
