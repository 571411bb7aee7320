"""The registry's generation: what the engine monitor and the KV-event subscriber follow, awaited
(:meth:`EngineRegistry.next_generation`) instead of polled."""

from __future__ import annotations

import asyncio

import pytest
from tests.conftest import free_port
from tests.router_discovery.conftest import until

from kvstack.router.engines import Endpoint, EngineRegistry
from kvstack.router.kvindex.follow import follow_registry
from kvstack.router.kvindex.index import KVIndex
from kvstack.router.kvindex.subscriber import KVEventSubscriber

A, B = "http://127.0.0.1:8101", "http://127.0.0.1:8102"


def ep(
    url: str, events: str | None = None, models: frozenset[str] = frozenset(), device: str | None = None
) -> Endpoint:
    return Endpoint(url=url, name=url, models=models, kv_events_endpoint=events, device=device)


@pytest.mark.parametrize(
    ("before", "after", "bumps"),
    [
        ([ep(A)], [ep(A)], False),  # nothing changed
        ([ep(A)], [ep(A), ep(B)], True),  # joined
        ([ep(A), ep(B)], [ep(A)], True),  # left
        ([ep(A)], [ep(A, "tcp://10.0.0.9:5557")], True),  # its KV events moved: resubscribe
        ([ep(A)], [ep(A, models=frozenset({"m"}))], True),  # another pod at its URL, models known
        ([ep(A, models=frozenset({"m"}))], [ep(A, models=frozenset({"m"}))], False),
    ],
)
def test_the_generation_moves_on_membership_and_endpoint_changes(
    before: list[Endpoint], after: list[Endpoint], bumps: bool
) -> None:
    registry = EngineRegistry()
    registry.sync(before)
    seen = registry.generation
    registry.sync(after)
    assert (registry.generation != seen) is bumps


async def test_a_follower_wakes_at_the_next_change_and_not_before() -> None:
    registry = EngineRegistry()
    registry.sync([ep(A)])
    seen = registry.generation
    waiter = asyncio.create_task(registry.next_generation(seen))
    for _ in range(5):
        await asyncio.sleep(0)
    registry.sync([ep(A)])  # no change: nobody wakes
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiter.done()
    registry.sync([ep(A), ep(B)])
    assert await asyncio.wait_for(waiter, 5.0) == seen + 1
    # a generation already past is returned at once
    assert await registry.next_generation(seen) == seen + 1


async def test_the_kv_event_subscriber_follows_an_engine_whose_event_endpoint_moved() -> None:
    """Membership unchanged, the KV-event endpoint new (another pod behind the same URL): before the
    generation counted endpoint changes, the subscriber kept following the old pod's events."""
    registry = EngineRegistry()
    subscriber = KVEventSubscriber(KVIndex())
    follower = asyncio.create_task(follow_registry(registry, subscriber))
    try:
        registry.sync([ep(A)])
        await until(lambda: subscriber.engines() == [A], "A followed")
        first = subscriber._feeds[A]
        assert first.task is None  # no events endpoint: nothing to read
        registry.sync([ep(A, f"tcp://127.0.0.1:{free_port()}")])
        await until(lambda: subscriber._feeds[A] is not first, "A followed again")
        assert subscriber._feeds[A].task is not None
        # a new device on the same pod and feed: the generation moves, the feed (and its blocks) stays
        moved = registry.generation
        second = subscriber._feeds[A]
        registry.sync([ep(A, second.state.endpoint.kv_events_endpoint, device="gpu-1")])
        assert registry.generation == moved + 1
        for _ in range(5):  # the follower's turn to look
            await asyncio.sleep(0)
        assert subscriber._feeds[A] is second
        # another pod behind the URL (IP reuse), publishing at the same address: a fresh feed
        events = second.state.endpoint.kv_events_endpoint
        registry.sync([Endpoint(url=A, name="pod-b", kv_events_endpoint=events, device="gpu-1")])
        await until(lambda: subscriber._feeds[A] is not second, "the new pod followed")
        registry.sync([])
        await until(lambda: subscriber.engines() == [], "A dropped")
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await subscriber.close()


def test_a_registry_followed_under_one_loop_can_be_followed_under_the_next() -> None:
    """A follower cancelled by its loop's shutdown leaves no wait behind that a later loop trips on
    (the router's tests start and stop routers, each on its own loop, over one registry)."""
    registry = EngineRegistry()

    async def follow_then_stop() -> None:
        task = asyncio.create_task(registry.next_generation(registry.generation))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(follow_then_stop())

    async def follow_a_change() -> int:
        task = asyncio.create_task(registry.next_generation(registry.generation))
        await asyncio.sleep(0)
        registry.sync([ep(A)])
        return await asyncio.wait_for(task, 5.0)

    assert asyncio.run(follow_a_change()) == 1
