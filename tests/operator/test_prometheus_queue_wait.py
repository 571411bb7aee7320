"""The operator's ``queueWaitP90`` query against a real Prometheus scraping a real router whose flow
queue holds requests for a real simulator: the histogram carries ``model_name``, so the signal sees data."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from kvstack.common.procs import ManagedProcess, running
from kvstack.common.waits import wait_until
from kvstack.observability.prometheus import Target, prometheus_process
from kvstack.operator.prom import Prometheus
from kvstack.operator.signals import observation, queries
from kvstack_testing.pod_sims import kvstack_executable

from ..conftest import free_port
from .test_prometheus_signals import MODEL, NAMESPACE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(router URL, Prometheus URL): one simulator running one request at a time behind the router."""
    workdir: Path = tmp_path_factory.mktemp("queue-wait")
    sim_port, router_port, prom_port = free_port(), free_port(), free_port()
    sim_url, router_url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{router_port}"
    sim = ManagedProcess(
        "sim",
        [
            kvstack_executable(),
            "engine",
            "sim",
            "--port",
            str(sim_port),
            "--model",
            MODEL,
            "--max-num-seqs",
            "1",
        ],
        workdir,
        ready_url=f"{sim_url}/health",
    )
    (workdir / "engines.yaml").write_text(
        yaml.safe_dump([{"url": sim_url, "name": "sim-0", "models": [MODEL]}])
    )
    # a hard ceiling of one request at the engine: the rest wait in the router's flow queue
    (workdir / "router.yaml").write_text(yaml.safe_dump({"max_in_flight_per_engine": 1}))
    router_argv = [kvstack_executable(), "router", "--port", str(router_port)]
    router_argv += ["--config", str(workdir / "router.yaml"), "--engines-file", str(workdir / "engines.yaml")]
    router = ManagedProcess("router", router_argv, workdir, ready_url=f"{router_url}/ready")
    targets = [Target("kvstack-router", router_url, pod="router-0")]
    prom = prometheus_process(workdir / "prometheus", targets, prom_port, rule_files=[], scrape_interval="1s")
    with running([sim, router, prom], timeout=60):
        yield router_url, f"http://127.0.0.1:{prom_port}"


async def test_queue_wait_p90_sees_the_routers_flow_queue_by_model(stack: tuple[str, str]) -> None:
    router_url, prom_url = stack

    async def one(client: httpx.AsyncClient) -> int:
        body = {"model": MODEL, "prompt": "hello " * 20, "max_tokens": 200, "ignore_eos": True}
        return (await client.post(f"{router_url}/v1/completions", json=body, timeout=120)).status_code

    prom = Prometheus(prom_url)
    loop = asyncio.get_running_loop()
    count = f'kvstack_router_flow_queue_wait_seconds_count{{model_name="{MODEL}"}}'
    try:
        async with httpx.AsyncClient() as client:
            assert await one(client) == 200  # an engine had room: the series starts (at a 0 s wait)

            def scraped() -> bool:
                return bool(asyncio.run_coroutine_threadsafe(prom.query(count), loop).result())

            await asyncio.to_thread(wait_until, scraped, "the series in Prometheus", 30, 0.5)
            statuses = await asyncio.gather(*(one(client) for _ in range(4)))
        assert statuses == [200] * 4  # three waited in the router's queue, none was lost

        def poll() -> float | None:
            q = queries("queueWaitP90", NAMESPACE, MODEL, 60, None)
            results = asyncio.run_coroutine_threadsafe(prom.results(q), loop).result()
            value = observation("queueWaitP90", time.time(), 1, results).value
            return value if value is not None and value > 0 else None

        p90 = await asyncio.to_thread(wait_until, poll, "a queue-wait p90 for the model", 60, 0.5)
        assert p90 > 0  # requests that waited behind the busy engine, seen by model
    finally:
        await prom.aclose()
