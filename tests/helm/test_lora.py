"""LoRA in the chart's values: the engines' flags and limits, the router's adapters, the checks, and a
rendered simulator that loads an adapter through the shared client and serves it to the openai SDK."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from tests.helm.conftest import HelmChart

from kvstack.common.lora import LoraClient
from kvstack.common.procs import ManagedProcess, free_ports
from kvstack.engine.serve.config import load_config
from kvstack.engine.serve.render import render
from kvstack.operator.lora_annotated import LORA as LORA_ANNOTATION
from kvstack.operator.lora_annotated import parse_lora
from kvstack_testing.pod_sims import kvstack_executable

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
LORA = {
    "enabled": True,
    "maxLoras": 4,
    "maxLoraRank": 32,
    "maxCpuLoras": 8,
    "adapters": [
        {"name": "sql", "source": "org/sql-lora", "pinned": True},
        {"name": "chat", "source": "/models/adapters/chat", "rank": 16},
    ],
}


def values(tmp_path: Path, lora: dict[str, Any] | None = LORA, **extra: Any) -> Path:
    model: dict[str, Any] = {"name": "llama-8b", "model": MODEL, "servedModelNames": ["llama"]}
    if lora is not None:
        model["lora"] = lora
    data: dict[str, Any] = {"engines": {"models": [model], **extra}, "lmcache": {"remote": {"mode": "none"}}}
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def router_config(rendered: Any) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(rendered.one("ConfigMap", "-router")["data"]["router.yaml"])
    return config


def test_lora_reaches_the_engine_config_and_the_router(chart: HelmChart, tmp_path: Path) -> None:
    rendered = chart.template([values(tmp_path)])
    text = rendered.one("ConfigMap", "-engine-llama-8b")["data"]["engine.yaml"]
    assert yaml.safe_load(text)["lora"] == {"max_loras": 4, "max_lora_rank": 32, "max_cpu_loras": 8}
    config = tmp_path / "engine.yaml"
    config.write_text(text)
    launched = render(load_config(config))  # the real loader and renderer, as the pod runs them
    flags = launched.argv[launched.argv.index("--enable-lora") :][:7]
    assert flags == ["--enable-lora", "--max-loras", "4", "--max-lora-rank", "32", "--max-cpu-loras", "8"]
    assert launched.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert router_config(rendered)["adapters"] == [
        {"name": "sql", "model": "llama", "source": "org/sql-lora"},
        {"name": "chat", "model": "llama", "source": "/models/adapters/chat"},
    ]


def test_no_lora_renders_none(chart: HelmChart, tmp_path: Path) -> None:
    rendered = chart.template([values(tmp_path, None)])
    assert "lora" not in yaml.safe_load(rendered.one("ConfigMap", "-engine-llama-8b")["data"]["engine.yaml"])
    assert "adapters" not in router_config(rendered)
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in rendered.text


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"maxCpuLoras": 2}, "engines.models[llama-8b].lora: maxCpuLoras (2) must be at least maxLoras (4)"),
        (
            {"maxLoraRank": 8},
            "engines.models[llama-8b].lora.adapters[1] (chat): rank 16 is over maxLoraRank 8",
        ),
        ({"maxLoraRank": 24}, "/engines/models/0/lora/maxLoraRank"),
        ({"enabled": False}, "engines.models[llama-8b].lora.adapters: set lora.enabled to serve them"),
        (
            {"adapters": [{"name": "a", "source": "o/a"}, {"name": "a", "source": "o/b"}]},
            'engines.models[llama-8b].lora.adapters[1]: "a" is declared twice',
        ),
        (
            {"adapters": [{"name": "llama", "source": "o/a"}]},
            'engines.models[llama-8b].lora.adapters[0]: "llama" is already a name of model llama-8b',
        ),
        ({"adapters": [{"name": "a", "source": "nowhere"}]}, "/engines/models/0/lora/adapters/0/source"),
        ({"adapters": [{"name": "a b", "source": "o/a"}]}, "/engines/models/0/lora/adapters/0/name"),
    ],
)
def test_bad_lora_values_fail_naming_the_model(
    chart: HelmChart, tmp_path: Path, change: dict[str, Any], says: str
) -> None:
    assert says in chart.template_error([values(tmp_path, {**LORA, **change})])


def test_an_adapter_of_two_models_fails(chart: HelmChart, tmp_path: Path) -> None:
    two = {
        "engines": {
            "models": [
                {"name": "a", "model": "org/a", "lora": LORA},
                {
                    "name": "b",
                    "model": "org/b",
                    "lora": {"enabled": True, "adapters": [{"name": "sql", "source": "o/x"}]},
                },
            ]
        }
    }
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(two))
    assert (
        'engines.models[b].lora.adapters[0]: "sql" is already an adapter of model a'
        in chart.template_error([path])
    )


def test_rendered_simulator_loads_an_adapter_and_serves_it(chart: HelmChart, tmp_path: Path) -> None:
    rendered = chart.template([values(tmp_path, simulator={"enabled": True})])
    (engine,) = rendered.one("Deployment", "-engine-llama-8b")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in engine["env"] if "value" in e}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    http, events, replay = free_ports(3)
    pod_to_here = {"0.0.0.0": "127.0.0.1", "8000": str(http), "tcp://*:5557": f"tcp://127.0.0.1:{events}"}
    pod_to_here |= {"tcp://*:5558": f"tcp://127.0.0.1:{replay}"}
    argv = [pod_to_here.get(a, a) for a in [*engine["command"], *engine["args"]]]
    url = f"http://127.0.0.1:{http}"
    sim = ManagedProcess(
        "sim",
        [kvstack_executable(), *argv[1:]],
        tmp_path,
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]},
        ready_url=f"{url}/health",
    )
    try:
        sim.start().wait_ready(60)

        async def load() -> None:
            client = LoraClient(timeout=10)
            try:
                await client.load(url, "sql", "org/sql-lora")
            finally:
                await client.aclose()

        asyncio.run(load())
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        assert {m.id for m in sdk.models.list()} == {"llama", "sql"}
        reply = sdk.completions.create(model="sql", prompt="SELECT", max_tokens=4)
        assert reply.model == "sql" and reply.choices[0].text
    finally:
        sim.stop()


def test_the_engine_deployment_carries_the_lora_annotation(chart: HelmChart, tmp_path: Path) -> None:
    rendered = chart.template([values(tmp_path)])
    dep = rendered.one("Deployment", "-engine-llama-8b")
    parsed = parse_lora(dep)  # the operator's own parser
    assert (parsed.max_loras, parsed.max_lora_rank, parsed.max_cpu_loras, parsed.interval_seconds) == (
        4,
        32,
        8,
        15,
    )
    assert [(a.name, a.source, a.pinned, a.rank) for a in parsed.adapters] == [
        ("sql", "org/sql-lora", True, None),
        ("chat", "/models/adapters/chat", False, 16),
    ]
    off = chart.template([values(tmp_path, None)]).one("Deployment", "-engine-llama-8b")
    assert LORA_ANNOTATION not in (off["metadata"].get("annotations") or {})
