"""Scale from zero through the flow queue: a request for a held model with no engine waits in the
model's flow queue (its class, its position, a client that leaves going at once) and the same queue
dispatches it when an engine of the model becomes ready.

Real router, real simulator started after the requests arrive. The router sends one request at a
time to the engine (``max_in_flight_per_engine: 1``), so the order in which the calls end is the
order in which the queue gave them their turns. Nothing here asserts a wall-clock time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import yaml

from kvstack.common.waits import wait_until, wait_until_async

from .conftest import MODEL, RouterFactory, RouterServer, run_sims
from .test_flow_e2e import Call, chat, flow_queued

CLASSES = [{"name": "interactive", "priority": 10}, {"name": "batch", "priority": 0}]
INTERACTIVE = {"x-kvstack-priority": "interactive"}


def held_router(router: RouterFactory, engines_file: Path, **values: object) -> RouterServer:
    engines_file.write_text("[]\n")
    return router(
        engines_file=engines_file,
        available=0,
        hold_models=[MODEL],
        max_in_flight_per_engine=1,
        flow_control={"classes": CLASSES, "default_class": "batch"},
        **values,
    )


def queued(r: RouterServer) -> float:
    return r.metric("kvstack_router_queued_requests", model_name=MODEL)


def leave_while_held(r: RouterServer, waiting: int) -> None:
    """One more request joins the held ones and its client goes away before any engine is up."""

    async def leave() -> None:
        async with httpx.AsyncClient() as client:
            task = asyncio.create_task(
                client.post(f"{r.url}/v1/chat/completions", json=chat("gone", 5), timeout=60)
            )
            await wait_until_async(
                lambda: flow_queued(r) == waiting + 1, "the request to be held in the queue", 20, 0.02
            )
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(leave())
    wait_until(lambda: flow_queued(r) == waiting, "the queue to let the request go", 10, 0.02)


def test_held_requests_wait_in_the_flow_queue_and_start_in_class_order_when_the_engine_comes_up(
    router: RouterFactory, tmp_path: Path
) -> None:
    engines_file = tmp_path / "engines.yaml"
    r = held_router(router, engines_file)
    done: list[str] = []
    batch = []
    for i in range(3):
        batch.append(Call(r, chat(f"batch {i}", 5), done, f"batch-{i}"))
        wait_until(lambda n=i + 1: flow_queued(r) == n, "batch work to be held in the queue", 20, 0.02)
    interactive = Call(r, chat("interactive", 5), done, "interactive", **INTERACTIVE)
    wait_until(lambda: flow_queued(r) == 4, "the interactive request to be held", 20, 0.02)
    leave_while_held(r, 4)
    assert queued(r) == 4.0  # the autoscaler's signal counts the held requests, the gone one not
    assert r.metric("kvstack_router_client_disconnects_total", model_name=MODEL) == 1
    assert done == []  # nothing was served without an engine

    with run_sims(tmp_path, 1, "--speed", "0.5") as sims:
        engines_file.write_text(yaml.safe_dump([{"url": sims[0].url}]))  # its models learnt from it
        responses = {c: c.join() for c in [*batch, interactive]}
        assert [resp.status_code for resp in responses.values()] == [200] * 4
        assert done == ["interactive", "batch-0", "batch-1", "batch-2"]  # class first, then FCFS
        got = responses[interactive]
        assert got.headers["x-kvstack-priority-class"] == "interactive"
        assert got.headers["x-kvstack-queue-position"] == "1"  # ahead of the three held batch requests
        assert int(got.headers["x-kvstack-queue-wait-ms"]) > 0
        assert [responses[c].headers["x-kvstack-queue-position"] for c in batch] == ["1", "2", "3"]
        assert sims[0].metric("vllm:request_success_total") == 4  # the gone client's never reached it
    assert flow_queued(r) == 0 and queued(r) == 0.0 and r.ctx.flow.reserved[MODEL] == 0
    assert r.metric("kvstack_router_requests_total", model_name=MODEL, engine="", status="499") == 1


def test_the_hold_bound_and_timeout_apply_to_a_request_held_in_the_flow_queue(
    router: RouterFactory, tmp_path: Path
) -> None:
    r = held_router(router, tmp_path / "engines.yaml", max_held_per_model=1, hold_timeout_s=2)
    first = Call(r, chat("first", 5), [], "first")
    wait_until(lambda: flow_queued(r) == 1, "the first request to be held in the queue", 20, 0.02)
    refused = httpx.post(
        f"{r.url}/v1/chat/completions", json=chat("second", 5), headers=INTERACTIVE, timeout=10
    )
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["message"] == f"too many requests waiting for {MODEL} to start"
    assert r.metric("kvstack_router_rejections_total", reason="hold_full") == 1
    timed_out = first.join()  # no engine came up: the hold's 503, not the queue's 429
    assert timed_out.status_code == 503 and int(timed_out.headers["retry-after"]) >= 1
    assert r.metric("kvstack_router_rejections_total", reason="hold_timeout") == 1
    assert flow_queued(r) == 0 and queued(r) == 0.0
