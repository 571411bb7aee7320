"""Placement by demand, from the router's own request counts: real simulators with LoRA, a real
router in front of them, a real Prometheus scraping the router, and the operator's round functions
(rates -> placement -> unloads and loads) without Kubernetes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from kvstack.common.lora import LoraClient
from kvstack.common.procs import ManagedProcess, free_port, running
from kvstack.common.waits import wait_until
from kvstack.observability.prometheus import LOCAL_NAMESPACE, PrometheusAPI, Target, prometheus_process
from kvstack.operator.lora_loader import execute, observe, request_rates
from kvstack.operator.lora_placement import Declared, Placement, place
from kvstack.operator.prom import Prometheus
from kvstack_testing.pod_sims import kvstack_executable

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MODEL = "sim-llama"
PATHS = {"sql": "kvstack/sql-lora", "chat": "kvstack/chat-lora", "idle": "kvstack/idle-lora"}


def test_busy_adapters_win_the_slots_and_idle_ones_give_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    kvstack = kvstack_executable()
    sims: dict[str, tuple[str, ManagedProcess]] = {}
    for pod in ("engine-0", "engine-1"):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [kvstack, "engine", "sim", "--port", str(port), "--model", MODEL, "--speed", "50",
                "--enable-lora", "--max-loras", "1", "--max-cpu-loras", "4"]  # fmt: skip
        sims[pod] = (url, ManagedProcess(pod, argv, tmp_path, ready_url=f"{url}/health"))
    engines_file = tmp_path / "engines.yaml"
    engines_file.write_text(yaml.safe_dump([{"url": url, "name": pod} for pod, (url, _) in sims.items()]))
    router_port = free_port()
    router_url = f"http://127.0.0.1:{router_port}"
    router = ManagedProcess(
        "router",
        [kvstack, "router", "--port", str(router_port), "--engines-file", str(engines_file)],
        tmp_path,
        env={"KVSTACK_ROUTER_MONITOR__MODELS_INTERVAL": "1", "KVSTACK_ROUTER_LOG_LEVEL": "warning"},
        ready_url=f"{router_url}/ready",
    )
    prom_port = free_port()
    prom = prometheus_process(
        tmp_path / "prometheus",
        [Target("kvstack-router", router_url, "router-0")],
        prom_port,
        rule_files=[],
        scrape_interval="1s",
    )
    urls = {pod: url for pod, (url, _) in sims.items()}

    async def round_trip(
        loads: dict[str, list[str]] | None,
    ) -> tuple[dict[str, float] | None, Placement | None]:
        client = LoraClient(timeout=10)
        prometheus = Prometheus(f"http://127.0.0.1:{prom_port}")
        try:
            if loads:  # the starting point: every adapter somewhere, as coverage would have placed them
                for pod, names in loads.items():
                    for name in names:
                        await client.load(urls[pod], name, PATHS[name])
                return None, None
            rates = await request_rates(prometheus, LOCAL_NAMESPACE, list(PATHS))
            states = await observe(client, urls)
            placement = place([Declared(n) for n in PATHS], states, 1, rates)
            await execute(client, placement, urls, PATHS)
            return rates, placement
        finally:
            await client.aclose()
            await prometheus.aclose()

    with running([p for _, p in sims.values()], timeout=60), running([router, prom], timeout=60):
        asyncio.run(round_trip({"engine-0": ["sql", "idle"], "engine-1": ["chat"]}))
        wait_until(
            lambda: (
                {"sql", "chat", "idle"}
                <= {m["id"] for m in httpx.get(f"{router_url}/v1/models").json()["data"]}
            ),
            "the router to list the adapters",
        )
        sdk = openai.OpenAI(base_url=f"{router_url}/v1", api_key="unused", max_retries=0)
        api = PrometheusAPI(f"http://127.0.0.1:{prom_port}")
        # A counter's first scrape is its baseline for rate(): one request each, scraped, then the load.
        for name in ("sql", "chat"):
            sdk.completions.create(model=name, prompt="warm up", max_tokens=2)
        api.wait_for('kvstack_router_requests_total{model_name="chat"}', timeout=30)
        for i in range(12):
            sdk.completions.create(model="sql", prompt=f"select {i}", max_tokens=2)
        for i in range(3):
            sdk.completions.create(model="chat", prompt=f"hello {i}", max_tokens=2)
        api.wait_for('sum(rate(kvstack_router_requests_total{model_name="chat"}[120s])) > 0', timeout=30)

        rates, placement = asyncio.run(round_trip(None))
        assert rates is not None and placement is not None
        assert rates["sql"] > rates["chat"] > 0 and rates["idle"] == 0
        # two engines, one slot each: the two adapters with demand keep one engine each; idle goes
        assert {a.name: (a.reason, len(a.engines)) for a in placement.adapters} == {
            "sql": ("demand", 1),
            "chat": ("demand", 1),
            "idle": ("idle", 0),
        }

        async def listed() -> dict[str, set[str]]:
            client = LoraClient(timeout=10)
            try:
                return {pod: {a.name for a in await client.loaded(url)} for pod, url in urls.items()}
            finally:
                await client.aclose()

        assert asyncio.run(listed()) == {"engine-0": {"sql"}, "engine-1": {"chat"}}
