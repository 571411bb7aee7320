"""Flow control end to end: a real router in front of real simulators driven into saturation.

The simulators run one request at a time (``--max-num-seqs 1``) at a fifth of real time, so an
engine's own waiting queue fills after two requests and the router sees it in its scrapes; from then
on requests wait in the router. Nothing here asserts a wall-clock time: the tests assert who was
served before whom, what each client got, and what reached an engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kvstack.common.waits import wait_until, wait_until_async

from .conftest import FAST_MONITOR, MODEL, RouterFactory, RouterServer, Sim, run_sims

CLASSES = [
    {"name": "interactive", "priority": 10},
    {"name": "urgent", "priority": 10, "ttft_objective_s": 0.005},  # below any TTFT: shed when queued
    {"name": "batch", "priority": 0},
]


def chat(text: str, max_tokens: int = 40) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}


@pytest.fixture
def one_at_a_time(tmp_path: Path) -> Iterator[list[Sim]]:
    with run_sims(tmp_path, 1, "--speed", "0.2", "--max-num-seqs", "1") as sims:
        yield sims


class Call:
    """One request in a thread; ``done`` records the order in which calls ended."""

    def __init__(
        self, r: RouterServer, body: dict[str, Any], done: list[str], name: str, **headers: str
    ) -> None:
        self.response: httpx.Response | None = None
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, args=(r, body, done, name, headers), daemon=True)
        self._thread.start()

    def _run(
        self, r: RouterServer, body: dict[str, Any], done: list[str], name: str, headers: dict[str, str]
    ) -> None:
        try:
            self.response = httpx.post(f"{r.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
            done.append(name)
        except Exception as err:
            self.error = err

    def join(self) -> httpx.Response:
        self._thread.join(60)
        assert self.response is not None, self.error
        return self.response


def flow_queued(r: RouterServer) -> int:
    queue = r.ctx.flow.queues.get(MODEL)
    return 0 if queue is None else len(queue)


def saturate(r: RouterServer, done: list[str]) -> list[Call]:
    """One long request running in the engine, a short one waiting there, and the router seeing it."""
    engine = r.ctx.registry.all()[0]
    running = Call(r, chat("running", 300), done, "running")
    wait_until(lambda: engine.in_flight == 1, "the long request at the engine", 20, 0.02)
    waiting = Call(r, chat("engine-queued", 10), done, "engine-queued")
    wait_until(
        lambda: (engine.num_waiting or 0) >= 1, "the engine's scrape to show its waiting queue", 20, 0.02
    )
    return [running, waiting]


def test_a_higher_class_queued_later_is_dispatched_before_batch_work_queued_earlier(
    one_at_a_time: list[Sim], router: RouterFactory
) -> None:
    r = router(
        engines=[one_at_a_time[0].url],
        flow_control={"classes": CLASSES, "default_class": "batch"},
        monitor=FAST_MONITOR,
    )
    done: list[str] = []
    first = saturate(r, done)
    batch = []
    for i in range(3):
        batch.append(Call(r, chat(f"batch {i}", 10), done, f"batch-{i}"))
        wait_until(lambda n=i + 1: flow_queued(r) == n, "batch work to wait in the router", 20, 0.02)
    urgent = Call(r, chat("urgent", 10), done, "urgent", **{"x-kvstack-priority": "urgent"})
    interactive = Call(
        r, chat("interactive", 10), done, "interactive", **{"x-kvstack-priority": "interactive"}
    )
    wait_until(lambda: flow_queued(r) == 4, "the interactive request to wait", 20, 0.02)
    # its objective (5 ms) cannot be met even on an idle engine, and batch work waits for the capacity
    # it would take: refused, not queued
    shed = urgent.join()
    assert shed.status_code == 429 and int(shed.headers["retry-after"]) >= 1
    # the exact wait beside the whole seconds: at least the floor, and what the seconds round up
    wait_ms = int(shed.headers["retry-after-ms"])
    assert 250 <= wait_ms <= 1000 * int(shed.headers["retry-after"])
    assert shed.json()["error"]["type"] == "RateLimitError" and "objective" in shed.json()["error"]["message"]

    responses = [c.join() for c in [*first, *batch, interactive]]
    assert [resp.status_code for resp in responses] == [200] * 6
    assert done.index("interactive") < done.index("batch-0")  # interactive went ahead of earlier batch
    assert [n for n in done if n.startswith("batch")] == ["batch-0", "batch-1", "batch-2"]  # FCFS
    got = interactive.join()
    assert got.headers["x-kvstack-priority-class"] == "interactive"
    assert got.headers["x-kvstack-queue-position"] == "1"  # ahead of the three batch requests
    assert int(got.headers["x-kvstack-queue-wait-ms"]) > 0
    assert responses[0].headers["x-kvstack-queue-position"] == "0"  # an engine had room
    # what each was admitted as and on: the first at once, the interactive one queued with a prediction
    assert responses[0].headers["x-kvstack-admission"] == "room"
    assert got.headers["x-kvstack-admission"] == "queued"
    assert int(got.headers["x-kvstack-predicted-ttft-ms"]) > 0
    assert r.metric("kvstack_router_flow_shed_total", reason="slo_prefill", **{"class": "urgent"}) == 1
    assert (
        r.metric("kvstack_router_flow_queue_wait_seconds_count", model_name=MODEL, **{"class": "batch"}) == 5
    )
    assert flow_queued(r) == 0 and r.ctx.flow.reserved[MODEL] == 0


def test_a_client_that_leaves_while_queued_never_reaches_an_engine(
    one_at_a_time: list[Sim], router: RouterFactory
) -> None:
    r = router(engines=[one_at_a_time[0].url], monitor=FAST_MONITOR)
    done: list[str] = []
    first = saturate(r, done)
    before = one_at_a_time[0].metric("vllm:request_success_total")

    async def leave() -> None:
        async with httpx.AsyncClient() as client:
            task = asyncio.create_task(
                client.post(f"{r.url}/v1/chat/completions", json=chat("gone"), timeout=60)
            )
            await asyncio.sleep(0)
            await wait_until_async(lambda: flow_queued(r) == 1, "the request to wait in the router", 20, 0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(leave())
    wait_until(lambda: flow_queued(r) == 0, "the queue to let the request go", 10, 0.02)
    assert r.metric("kvstack_router_queued_requests", model_name=MODEL) == 0
    for call in first:
        assert call.join().status_code == 200
    wait_until(
        lambda: r.metric("kvstack_router_requests_total", model_name=MODEL, engine="", status="499") == 1,
        "the request to be counted as gone before any engine",
        10,
        0.02,
    )
    assert one_at_a_time[0].metric("vllm:request_success_total") == before + 2  # only the two first


def test_a_burst_above_capacity_gets_a_200_or_a_429_with_retry_after_each(
    one_at_a_time: list[Sim], router: RouterFactory
) -> None:
    r = router(
        engines=[one_at_a_time[0].url],
        flow_control={"models": [{"model": "*", "max_queue": 3}]},
        monitor=FAST_MONITOR,
    )
    done: list[str] = []
    first = saturate(r, done)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            sends = [
                client.post(f"{r.url}/v1/chat/completions", json=chat(f"burst {i}", 5)) for i in range(12)
            ]
            return list(await asyncio.gather(*sends))

    responses = asyncio.run(burst())
    codes = sorted(resp.status_code for resp in responses)
    assert set(codes) == {200, 429}, codes
    refused = [resp for resp in responses if resp.status_code == 429]
    assert all(int(resp.headers["retry-after"]) >= 1 for resp in refused)
    assert all(resp.json()["error"]["type"] == "RateLimitError" for resp in refused)
    served = [resp for resp in responses if resp.status_code == 200]
    assert max(int(resp.headers["x-kvstack-queue-position"]) for resp in served) >= 2
    assert all(resp.headers["x-kvstack-priority-class"] == "default" for resp in served)
    assert r.metric("kvstack_router_flow_shed_total", reason="queue_full", **{"class": "default"}) == len(
        refused
    )
    for call in first:
        assert call.join().status_code == 200
    assert flow_queued(r) == 0 and r.ctx.flow.reserved[MODEL] == 0


def test_a_streamed_request_counts_toward_goodput_and_logs_its_class_tenant_and_wait(
    one_at_a_time: list[Sim], router: RouterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    r = router(
        engines=[one_at_a_time[0].url],
        access_log=True,
        flow_control={
            "classes": [
                {"name": "interactive", "priority": 1, "ttft_objective_s": 60.0},
                {"name": "default"},
            ],
            "tenants": [{"name": "team-a", "default_class": "interactive"}],
        },
    )
    client = openai.OpenAI(
        base_url=f"{r.url}/v1", api_key="none", default_headers={"x-kvstack-tenant": "team-a"}
    )
    with caplog.at_level(logging.INFO, logger="kvstack.router.access"):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=5, stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
        assert text
        assert raw.headers["x-kvstack-priority-class"] == "interactive"  # the tenant's default class
        lines = wait_until(
            lambda: [rec for rec in caplog.records if rec.name == "kvstack.router.access"],
            "the access line",
            10,
        )
    line = lines[0]
    fields = tuple(getattr(line, name) for name in ("priority_class", "tenant", "queue_wait_ms"))
    assert fields == ("interactive", "team-a", 0.0)  # sent at once: an engine had room
    labels = {"model_name": MODEL, "class": "interactive"}
    assert r.metric("kvstack_router_flow_goodput_total", **labels) == 1
    assert r.metric("kvstack_router_flow_objective_misses_total", **labels) == 0
    assert r.metric("kvstack_router_flow_ttft_prediction_ratio_count", **{"class": "interactive"}) == 1
