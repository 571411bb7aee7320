"""The monitor against real simulated vLLM 0.24 engines (``kvstack engine sim`` processes)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import openai
import pytest
from tests.conftest import free_port
from tests.router_discovery.test_monitor_live import until

from kvstack.common.procs import ManagedProcess
from kvstack.router.engines import Endpoint, EngineRegistry
from kvstack.router.fetch import EngineFetch
from kvstack.router.monitor import EngineMonitor, MonitorConfig

CONFIG = MonitorConfig(
    probe_interval=0.1,
    probe_timeout=1.0,
    unhealthy_threshold=2,
    healthy_threshold=2,
    scrape_interval=0.1,
    scrape_timeout=1.0,
    stale_after=0.5,
)


def sim(log_dir: Path, port: int, model: str = "sim-8b", *extra: str) -> ManagedProcess:
    argv = [
        str(Path(sys.executable).with_name("kvstack")),
        "engine",
        "sim",
        "--port",
        str(port),
        "--model",
        model,
        *extra,
    ]
    return ManagedProcess(f"sim-{port}", argv, log_dir, ready_url=f"http://127.0.0.1:{port}/health")


@pytest.fixture
def engine_proc(tmp_path: Path) -> Iterator[ManagedProcess]:
    proc = sim(tmp_path, free_port())
    try:
        proc.start().wait_ready(60)
        yield proc
    finally:
        proc.stop()


@pytest.fixture
async def monitored(engine_proc: ManagedProcess) -> AsyncIterator[tuple[EngineRegistry, str]]:
    async with monitoring(engine_proc) as running:
        yield running


@contextlib.asynccontextmanager
async def monitoring(engine_proc: ManagedProcess) -> AsyncIterator[tuple[EngineRegistry, str]]:
    url = engine_proc.ready_url.removesuffix("/health") if engine_proc.ready_url else ""
    registry = EngineRegistry()
    registry.sync([Endpoint(url, "sim")])
    client = EngineFetch()
    monitor = EngineMonitor(registry, client, CONFIG)
    monitor.start()
    try:
        yield registry, url
    finally:
        await monitor.stop()
        await client.aclose()


async def test_scrapes_follow_load(monitored: tuple[EngineRegistry, str]) -> None:
    registry, url = monitored
    (st,) = registry.all()
    await until(lambda: st.models == {"sim-8b"} and st.num_running == 0, "models and an idle scrape", 30)
    assert st.block_size == 16 and (st.num_gpu_blocks or 0) > 0
    assert st.kv_cache_usage == 0.0

    sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    streams = []
    try:
        for i in range(3):
            stream = await sdk.completions.create(
                model="sim-8b",
                prompt=f"request {i} " + "lorem ipsum " * 200,
                max_tokens=20000,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            await stream.__anext__()  # it is running once the first token came back
            streams.append(stream)
        await until(lambda: st.num_running == 3, "three running requests scraped", 30)
        assert (st.kv_cache_usage or 0.0) > 0.0
        assert st.load >= 3
    finally:
        for stream in streams:
            await stream.close()
        await sdk.close()
    await until(lambda: st.num_running == 0, "aborted requests leave the engine", 30)


async def test_killed_engine_is_marked_unhealthy_and_readmitted_after_restart(
    monitored: tuple[EngineRegistry, str], engine_proc: ManagedProcess, tmp_path: Path
) -> None:
    registry, url = monitored
    (st,) = registry.all()
    await until(lambda: st.available(time.monotonic()) and st.num_running == 0, "engine up", 30)
    engine_proc.stop()
    await until(lambda: not st.healthy, "dead engine unhealthy", 30)
    await until(lambda: st.num_running is None, "its figures go stale", 30)
    assert registry.candidates("sim-8b", time.monotonic()) == []

    port = int(url.rsplit(":", 1)[1])
    again = sim(tmp_path / "again", port)
    try:
        again.start()
        await asyncio.to_thread(again.wait_ready, 60)
        await until(lambda: st.healthy and st.num_running == 0, "re-admitted after restart", 30)
        assert registry.candidates("sim-8b", time.monotonic()) == [st]
    finally:
        again.stop()


async def test_the_engines_queue_wait_is_read_from_its_scrapes(tmp_path: Path) -> None:
    """One batch slot: a second request waits in the simulator's queue while the first runs; once
    the engine schedules it, its wait (vllm:request_queue_time_seconds) is the engine's queue wait,
    and it is 0 again once nothing waits and nothing new was scheduled."""
    proc = sim(tmp_path, free_port(), "sim-8b", "--max-num-seqs", "1")
    proc.start().wait_ready(60)
    try:
        async with monitoring(proc) as (registry, url):
            (st,) = registry.all()
            await until(lambda: st.num_running == 0, "an idle scrape", 30)
            assert st.queue_wait_s == 0.0
            sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            try:
                first = await sdk.completions.create(
                    model="sim-8b", prompt="hold the slot", max_tokens=20000, stream=True,
                    extra_body={"ignore_eos": True},
                )  # fmt: skip
                await first.__anext__()
                second = asyncio.create_task(
                    sdk.completions.create(model="sim-8b", prompt="wait for it", max_tokens=4)
                )
                await until(lambda: st.num_waiting == 1, "the second request waiting", 30)
                await first.close()  # the slot frees: the engine schedules the second
                await second
                await until(lambda: st.queue_wait_s > 0.0, "the second request's wait scraped", 30)
                await until(lambda: st.queue_wait_s == 0.0, "no wait once nothing waits", 30)
            finally:
                await sdk.close()
    finally:
        proc.stop()
