"""End to end: the operator places, loads, unloads and re-loads LoRA adapters on simulated engines.

Real API server + controller-manager + kwok pods, a ``kvstack engine sim`` with vLLM 0.24's LoRA
surface per Running engine pod on the pod's IP (PodSimulators), and the operator under KopfRunner.
Prometheus is left unreachable on purpose: the request rates are unknown, so placement holds what is
loaded and spreads the rest over free slots (the demand path is covered by the placement's tables).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from kvstack.common.kube import resource_path
from kvstack.common.lora import LoraClient, LoraError
from kvstack.common.procs import free_port
from kvstack.common.waits import wait_until
from kvstack.operator.runtime import Runtime
from kvstack_testing import Cluster, PodSimulators, operator_runner, operator_settings

from .conftest import Api

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = "sim-llama"
ENGINES = "demo-llama"


def model(adapters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "llama",
        "model": MODEL,
        "gpus": 1,
        "replicas": 2,
        "podAnnotations": {
            "sim.kvstack.io/model": MODEL,
            # what kvstack engine serve renders for lora {maxLoras: 2}
            "sim.kvstack.io/args": "--enable-lora --max-loras 2 --max-lora-rank 16",
        },
        "lora": {"maxLoras": 2, "adapters": adapters},
    }


SQL = {"name": "sql", "source": "kvstack/sql-lora", "pinned": True}
CHAT = {"name": "chat", "source": "kvstack/chat-lora"}


def loaded_on(sims: PodSimulators) -> dict[str, list[str]]:
    """Pod name -> the adapters its simulator lists, straight from the engines that answer."""

    async def read() -> dict[str, list[str]]:
        client = LoraClient(timeout=5)
        try:
            out = {}
            for target in sims.targets.values():
                with contextlib.suppress(LoraError):  # a pod going away, or one still starting
                    out[target.name] = sorted(a.name for a in await client.loaded(target.url))
            return out
        finally:
            await client.aclose()

    return asyncio.run(read())


def adapters_status(api: Api) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in api.get("demo").get("status", {}).get("adapters") or []}


def reasons(api: Api) -> list[str]:
    return [e["reason"] for e in api.events("demo")]


@pytest.mark.usefixtures("kubeconfig_env")
def test_adapters_are_loaded_unloaded_and_reloaded_after_a_restart(
    cluster: Cluster, namespace: str, api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")  # the simulators inherit it
    spec: dict[str, Any] = {
        "models": [model([SQL, CHAT])],
        "router": {"enabled": False},
        "cache": {"mode": "none"},
        "autoscaling": {"enabled": False, "intervalSeconds": 1},
    }
    unreachable = f"http://127.0.0.1:{free_port()}"
    runtime = Runtime(operator_settings(cluster, namespace, prometheus_url=unreachable))
    sims = PodSimulators(cluster.credentials(), "app.kubernetes.io/component=engine", namespace=namespace)
    with sims, operator_runner(runtime, namespace) as runner:
        api.create("demo", spec)
        sims.wait_for(2, timeout=90)

        # 1. Declared: sql (pinned) on both engines, chat on one (a free slot, no demand known).
        status = wait_until(
            lambda: (
                (s := adapters_status(api)).get("sql", {}).get("loaded") == 2
                and s.get("chat", {}).get("loaded") == 1
                and s
            ),
            "both adapters loaded",
            timeout=90,
        )
        assert status["sql"] == {
            "name": "sql", "model": "llama", "desired": 2, "loaded": 2, "engines": 2, "reason": "pinned",
        }  # fmt: skip
        assert status["chat"]["desired"] == 1 and status["chat"]["reason"] in ("spare_capacity", "held")
        on = loaded_on(sims)
        assert all("sql" in names for names in on.values()), on
        assert sum("chat" in names for names in on.values()) == 1, on
        wait_until(lambda: "AdapterLoaded" in reasons(api), "an AdapterLoaded Event")
        ready = wait_until(
            lambda: (c := api.condition("demo", "AdaptersReady")) and c["status"] == "True" and c,
            "AdaptersReady=True",
        )
        assert ready["reason"] == "AdaptersLoaded"
        loads = runtime.metrics.registry.get_sample_value(
            "kvstack_operator_lora_operations_total",
            {"namespace": namespace, "model_name": MODEL, "operation": "load", "result": "success"},
        )
        assert loads == 3

        # 2. Removed: chat is unloaded everywhere and leaves the status.
        api.patch_spec("demo", {"models": [model([SQL])]})
        wait_until(
            lambda: all(names == ["sql"] for names in loaded_on(sims).values()), "chat unloaded", timeout=60
        )
        wait_until(lambda: set(adapters_status(api)) == {"sql"}, "chat gone from the status")
        wait_until(lambda: "AdapterUnloaded" in reasons(api), "an AdapterUnloaded Event")

        # 3. An engine restarts (its pod is replaced): the new one gets sql back.
        victim = sorted(loaded_on(sims))[0]
        api.kube.delete(resource_path("v1", "pods", namespace, victim))
        wait_until(
            lambda: (on := loaded_on(sims)) and victim not in on and len(on) == 2 and on,
            "a replacement engine",
            timeout=90,
        )
        wait_until(
            lambda: all(names == ["sql"] for names in loaded_on(sims).values()),
            "sql re-loaded on the new engine",
            timeout=60,
        )

        # 4. An adapter the engines refuse (rank 64 over maxLoraRank 16): a warning Event, lastError.
        big = tmp_path / "big"
        big.mkdir()
        (big / "adapter_config.json").write_text(json.dumps({"r": 64}))
        api.patch_spec("demo", {"models": [model([SQL, {"name": "big", "source": str(big)}])]})
        failed = wait_until(
            lambda: (b := adapters_status(api).get("big")) and "lastError" in b and b,
            "big's lastError",
            timeout=60,
        )
        assert failed["loaded"] == 0 and "greater than max_lora_rank" in failed["lastError"]
        wait_until(lambda: "AdapterLoadFailed" in reasons(api), "an AdapterLoadFailed Event")
        failing = wait_until(
            lambda: (c := api.condition("demo", "AdaptersReady")) and c["status"] == "False" and c,
            "AdaptersReady=False",
        )
        assert failing["reason"] == "AdapterLoadFailed" and "big:" in failing["message"]
        assert (
            runtime.metrics.registry.get_sample_value(
                "kvstack_operator_lora_operations_total",
                {"namespace": namespace, "model_name": MODEL, "operation": "load", "result": "failure"},
            )
            or 0
        ) >= 1
    assert runner.exit_code == 0, runner.output
