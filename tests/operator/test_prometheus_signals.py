"""The autoscaler's queries against a real Prometheus scraping real simulators, and its failure modes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from kvstack.common.procs import ManagedProcess, running
from kvstack.common.waits import wait_until
from kvstack.observability.prometheus import Target, prometheus_process
from kvstack.operator.autoscale import Observation, Policy, decide
from kvstack.operator.prom import Prometheus, PrometheusError
from kvstack.operator.signals import observation, queries
from kvstack_testing.pod_sims import kvstack_executable

from ..conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
MODEL = "sim-a"
NAMESPACE = "local"  # the namespace label kvstack's local Prometheus config gives every target


@dataclass
class Live:
    prom_url: str
    sims: list[ManagedProcess]
    urls: list[str]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    workdir: Path = tmp_path_factory.mktemp("prom")
    ports = [free_port(), free_port()]
    sims = [
        ManagedProcess(
            f"sim-{i}",
            [
                kvstack_executable(),
                "engine",
                "sim",
                "--port",
                str(p),
                "--model",
                MODEL,
                "--max-num-seqs",
                "1",
            ],
            workdir,
            ready_url=f"http://127.0.0.1:{p}/health",
        )
        for i, p in enumerate(ports)
    ]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    targets = [Target("kvstack-engine", url, pod=f"sim-{i}") for i, url in enumerate(urls)]
    prom_port = free_port()
    prom = prometheus_process(workdir / "prometheus", targets, prom_port, rule_files=[], scrape_interval="1s")
    with running([*sims, prom], timeout=60):
        yield Live(f"http://127.0.0.1:{prom_port}", sims, urls)


@contextlib.asynccontextmanager
async def load(url: str, concurrent: int) -> AsyncIterator[None]:
    """``concurrent`` long completions in flight against one simulator (max-num-seqs 1: the rest wait)."""

    async def one(client: httpx.AsyncClient) -> None:
        body = {"model": MODEL, "prompt": "hello " * 20, "max_tokens": 4000, "ignore_eos": True}
        with contextlib.suppress(httpx.HTTPError):
            await client.post(f"{url}/v1/completions", json=body, timeout=120)

    async with httpx.AsyncClient() as client:
        tasks = [asyncio.create_task(one(client)) for _ in range(concurrent)]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def observe_until(
    prom: Prometheus, current: int, done: Callable[[Observation], bool], what: str, wait_s: float = 30.0
) -> Observation:
    """The first waiting-per-replica Observation that is ``done``.

    ``wait_until`` polls from a worker thread, each query running on this loop (the Prometheus
    client belongs to it), because a predicate cannot await.
    """
    q = queries("waitingPerReplica", NAMESPACE, MODEL, window_s=60, idle_s=None)
    loop = asyncio.get_running_loop()
    seen: list[Observation] = []

    def poll() -> Observation | None:
        results = asyncio.run_coroutine_threadsafe(prom.results(q), loop).result()
        seen.append(observation("waitingPerReplica", time.time(), current, results))
        return seen[-1] if done(seen[-1]) else None

    try:
        found: Observation = await asyncio.to_thread(wait_until, poll, what, wait_s, 0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {seen[-1:]}") from None
    return found


async def test_waiting_per_replica_from_live_prometheus_drives_a_scale_up(live: Live) -> None:
    prom = Prometheus(live.prom_url)
    try:
        async with load(live.urls[0], concurrent=5):
            # 4 waiting on one pod, 0 on the other
            obs = await observe_until(
                prom, 2, lambda o: o.value == 2.0 and o.capacity is not None, "waiting per replica of 2"
            )
        assert obs.reporting == 2
        assert obs.running == 0.5  # the loaded pod runs its one sequence, the other none
        assert obs.capacity == 1.0  # what the saturated pod ran while requests waited: its max_num_seqs
        assert 0 <= obs.age_s < 10
        assert obs.pending is None  # no router scraped: unknown, not zero
        decision = decide(Policy("waiting", 1.0, 1, 10), obs)
        assert (decision.replicas, decision.reason) == (4, "queue")
        idle = await observe_until(prom, 2, lambda o: o.value == 0.0, "waiting per replica of 0")
        assert decide(Policy("waiting", 1.0, 1, 10), idle).reason == "cooldown"  # window holds it
    finally:
        await prom.aclose()


async def test_kv_usage_and_idle_ttft_signals(live: Live) -> None:
    prom = Prometheus(live.prom_url)
    try:
        kv = await prom.results(queries("kvCacheUsage", NAMESPACE, MODEL, 60, None))
        obs = observation("kvCacheUsage", time.time(), 2, kv)
        assert obs.reporting == 2 and obs.value is not None and 0.0 <= obs.value <= 1.0
        ttft = await prom.results(queries("ttftP90", NAMESPACE, MODEL, 60, 600))
        obs = observation("ttftP90", time.time(), 2, ttft)
        assert obs.value is not None and obs.reporting == 2
        assert obs.idle is not None
    finally:
        await prom.aclose()


async def test_a_stopped_pod_makes_the_data_partial(live: Live) -> None:
    prom = Prometheus(live.prom_url)
    try:
        live.sims[1].stop()
        obs = await observe_until(prom, 2, lambda o: o.reporting == 1, "one pod reporting")
        decision = decide(Policy("waiting", 5.0, 1, 10, down_window_s=0), obs)
        assert (decision.replicas, decision.reason) == (2, "metrics_unavailable")
    finally:
        await prom.aclose()


async def test_unreachable_or_refusing_prometheus_raises() -> None:
    prom = Prometheus(f"http://127.0.0.1:{free_port()}", timeout=2.0)
    try:
        with pytest.raises(PrometheusError, match="cannot query Prometheus"):
            await prom.query("up")
    finally:
        await prom.aclose()


async def test_a_bad_query_is_an_error(live: Live) -> None:
    prom = Prometheus(live.prom_url)
    try:
        with pytest.raises(PrometheusError, match="refused"):
            await prom.query("sum(")
    finally:
        await prom.aclose()
