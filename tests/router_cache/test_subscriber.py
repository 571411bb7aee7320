"""The KV-event subscriber against a real ZMQ PUB + ROUTER replay publisher."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest

from kvstack.common.blocks import block_keys, chain_root
from kvstack.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, encode_seq
from kvstack.router.engines import Endpoint, EngineState
from kvstack.router.kvindex.index import KVIndex
from kvstack.router.kvindex.subscriber import KVEventSubscriber, SubscriberSettings

MODEL, BS = "m", 16
_h = itertools.count(1)

Source = Any  # the EventSource class of conftest.py (not importable under importlib mode)
MakeSource = Callable[[], Awaitable[Source]]
Until = Callable[[Callable[[], bool]], Awaitable[None]]


def prompt(i: int, blocks: int = 4) -> list[int]:
    return [(i * 7919 + j) % 30000 for j in range(blocks * BS)]


def keys(tokens: Sequence[int]) -> list[int]:
    return block_keys(tokens, BS, chain_root(MODEL))


def store(tokens: Sequence[int]) -> tuple[BlockStored, list[int]]:
    hashes = [next(_h) for _ in range(len(tokens) // BS)]
    ev = BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=list(tokens), block_size=BS)
    return ev, hashes


def engine(src: Source | None, url: str = "http://a", *, replay: bool = True) -> EngineState:
    ep = Endpoint(
        url=url,
        name=url,
        models=frozenset({MODEL}),
        kv_events_endpoint=src.endpoint if src else None,
        kv_events_replay_endpoint=src.replay_endpoint if src and replay else None,
    )
    return EngineState(endpoint=ep, models=ep.models, block_size=BS)


def dead_replay(src: Source, url: str) -> EngineState:
    """An engine publishing on ``src`` whose replay socket nobody serves: its replays time out."""
    ep = Endpoint(
        url=url,
        name="dead-replay",
        models=frozenset({MODEL}),
        kv_events_endpoint=src.endpoint,
        kv_events_replay_endpoint="tcp://127.0.0.1:1",  # nothing listens: the DEALER never connects
    )
    return EngineState(endpoint=ep, models=ep.models)


def held(index: KVIndex, tokens: Sequence[int], url: str = "http://a") -> int:
    return index.match(url, keys(tokens), 0.0).gpu_blocks


@pytest.fixture
async def subscriber() -> AsyncIterator[KVEventSubscriber]:
    sub = KVEventSubscriber(KVIndex(), SubscriberSettings(replay_timeout_s=0.5, replay_cooldown_s=0.0))
    try:
        yield sub
    finally:
        await sub.close()


async def test_history_is_replayed_on_connect_and_live_events_follow(
    subscriber: KVEventSubscriber, event_source: MakeSource, until: Until
) -> None:
    src = await event_source()
    before, _ = store(prompt(1))
    await src.publish([before])  # nobody listens yet: only the replay can deliver it
    subscriber.add_engine(engine(src))
    await until(lambda: held(subscriber.index, prompt(1)) == 4)
    after, _ = store(prompt(2))
    await src.publish([after])
    await until(lambda: held(subscriber.index, prompt(2)) == 4)
    assert subscriber.counters.gaps == 0
    assert subscriber.counters.batches_applied == 2
    assert subscriber.indexed_blocks == 8


async def test_a_gap_is_replayed_and_converges_to_the_full_stream(
    subscriber: KVEventSubscriber, event_source: MakeSource, until: Until
) -> None:
    src = await event_source()
    subscriber.add_engine(engine(src))
    await until(lambda: subscriber.counters.replays == 1)
    history: list[list[KVEvent]] = []
    # stores, removals and a clear; every third batch is lost on the wire
    for i in range(12):
        ev, hashes = store(prompt(i))
        batch: list[KVEvent] = [ev]
        if i % 4 == 3:
            batch.append(BlockRemoved(block_hashes=hashes[2:]))  # a later removal must not be undone
        if i == 6:
            batch = [AllBlocksCleared(), ev]
        history.append(batch)
        await src.publish(batch, deliver=i % 3 != 1)
    last, _ = store(prompt(99))
    await src.publish([last])
    history.append([last])
    await until(lambda: held(subscriber.index, prompt(99)) == 4)

    reference = KVIndex()  # a subscriber that saw every batch
    reference.ensure_engine("http://a", model=MODEL, block_size=BS)
    for batch in history:
        reference.apply("http://a", batch)
    for i in [*range(12), 99]:
        assert held(subscriber.index, prompt(i)) == held(reference, prompt(i)), i
    assert subscriber.indexed_blocks == reference.indexed_blocks
    assert subscriber.counters.gaps >= 1
    assert subscriber.counters.lost_batches == 0
    assert [held(reference, prompt(i)) for i in (0, 3, 7)] == [0, 0, 2]  # the test is not vacuous


async def test_an_engine_restart_clears_its_entries(
    subscriber: KVEventSubscriber, event_source: MakeSource, until: Until
) -> None:
    src = await event_source()
    subscriber.add_engine(engine(src))
    for i in range(3):
        await src.publish([store(prompt(i))[0]])
    await until(lambda: held(subscriber.index, prompt(2)) == 4)
    await src.restart()
    await until(lambda: subscriber.counters.replays >= 1)
    # the SUB reconnects by itself; batches the new process sends before that are lost live
    for n in range(200):
        await src.publish([store(prompt(50 + n))[0]])
        await asyncio.sleep(0.02)
        if held(subscriber.index, prompt(50)) == 4:
            break
    assert held(subscriber.index, prompt(50)) == 4, subscriber.counters  # the new process history
    assert subscriber.counters.resets == 1
    assert [held(subscriber.index, prompt(i)) for i in range(3)] == [0, 0, 0]


async def test_malformed_messages_are_counted_and_skipped(
    subscriber: KVEventSubscriber, event_source: MakeSource, until: Until
) -> None:
    src = await event_source()
    subscriber.add_engine(engine(src, replay=False))
    probe, _ = store(prompt(0))
    while held(subscriber.index, prompt(0)) == 0:  # wait until the SUB is connected
        await src.publish([probe])
        await asyncio.sleep(0.02)
    await src.send_raw([b"kv-events", b"short"])  # two frames
    await src.send_raw([b"kv-events", b"\x00\x01", b"x"])  # a bad sequence frame
    await src.send_raw([b"kv-events", encode_seq(src.seq), b"\xc1not msgpack"])
    src.seq += 1
    await src.publish([store(prompt(1))[0]])
    await until(lambda: held(subscriber.index, prompt(1)) == 4)
    assert subscriber.counters.malformed == 3
    assert subscriber.counters.gaps == 0


async def test_without_replay_a_gap_is_counted_and_live_events_go_on(
    subscriber: KVEventSubscriber, event_source: MakeSource, until: Until
) -> None:
    src = await event_source()
    subscriber.add_engine(engine(src, replay=False))
    probe, _ = store(prompt(0))
    while held(subscriber.index, prompt(0)) == 0:
        await src.publish([probe])
        await asyncio.sleep(0.02)
    await src.publish([store(prompt(1))[0]], deliver=False)
    await src.publish([store(prompt(2))[0]])
    await until(lambda: held(subscriber.index, prompt(2)) == 4)
    assert held(subscriber.index, prompt(1)) == 0
    assert (subscriber.counters.gaps, subscriber.counters.lost_batches) == (1, 1)


async def test_engines_come_and_go(
    subscriber: KVEventSubscriber, event_source: MakeSource, until: Until
) -> None:
    src = await event_source()
    subscriber.add_engine(engine(src))
    subscriber.add_engine(engine(None, "http://b"))  # publishes no events: approximate tracking
    await src.publish([store(prompt(1))[0]])
    await until(lambda: held(subscriber.index, prompt(1)) == 4)
    assert sorted(subscriber.engines()) == ["http://a", "http://b"]
    subscriber.remove_engine("http://a")
    assert held(subscriber.index, prompt(1)) == 0
    assert subscriber.index.engines() == ["http://b"]
    subscriber.index.record_dispatch("http://b", keys(prompt(2)), now=0.0)
    assert held(subscriber.index, prompt(2), "http://b") == 4


async def test_a_replay_endpoint_nobody_serves_times_out_and_live_events_go_on(
    subscriber: KVEventSubscriber, event_source: MakeSource, until: Until
) -> None:
    """An engine whose replay socket is gone costs one bounded wait, not a stalled feed."""
    src = await event_source()
    subscriber.add_engine(dead_replay(src, "http://a"))
    await until(lambda: subscriber.counters.replay_failures >= 1)
    probe, _ = store(prompt(9))
    while held(subscriber.index, prompt(9)) == 0:  # live events flow once the replay gave up
        await src.publish([probe])
        await asyncio.sleep(0.02)


async def test_a_long_replay_lets_the_event_loop_serve_meanwhile(
    subscriber: KVEventSubscriber, event_source: MakeSource, until: Until
) -> None:
    """A router started beside a busy engine replays its whole buffer (vLLM keeps 10,000 steps).
    Buffered ZMQ messages are received without yielding, so applying them in one go held the loop:
    on the H200 a router's ``/ready`` timed out. The replay yields every so many batches."""
    src = await event_source()
    batches = 1_000
    for i in range(batches):
        await src.publish([store(prompt(i, 1))[0]], deliver=False)  # history only the replay has
    turns = 0  # event-loop turns another task got while the replay was part-way through

    async def other_work() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            if 0 < subscriber.counters.batches_applied < batches:
                turns += 1

    task = asyncio.get_running_loop().create_task(other_work())
    try:
        subscriber.add_engine(engine(src))
        await until(lambda: subscriber.counters.batches_applied == batches)
    finally:
        task.cancel()
    assert subscriber.counters.replays == 1 and subscriber.counters.lost_batches == 0
    assert turns >= batches // 64 - 1, turns


async def test_an_engine_is_syncing_until_its_history_is_applied_or_its_replay_gave_up(
    subscriber: KVEventSubscriber, event_source: MakeSource, until: Until
) -> None:
    """What ``/ready`` waits for (router/readiness.py): an engine's first replay."""
    src = await event_source()
    for i in range(200):
        await src.publish([store(prompt(i, 1))[0]], deliver=False)  # history only the replay has
    subscriber.add_engine(engine(src))
    subscriber.add_engine(dead_replay(src, "http://dead"))
    subscriber.add_engine(engine(None, "http://quiet"))  # publishes no events: nothing to wait for
    assert sorted(subscriber.syncing()) == ["http://a", "http://dead"]
    await until(lambda: "http://a" not in subscriber.syncing())
    assert subscriber.counters.batches_applied >= 200  # its whole history was in before it left
    await until(lambda: not subscriber.syncing())
    assert subscriber.counters.replay_failures == 1


async def test_a_replay_whose_tail_was_dropped_is_asked_again_from_where_it_stopped(
    subscriber: KVEventSubscriber, event_source: MakeSource, until: Until
) -> None:
    """vLLM sends its whole buffer at once through a ROUTER socket, which drops what does not fit
    the pipe: on the simulators a 5,000-batch replay lost its tail and end marker, timed out, and
    left the index without hundreds of batches, uncounted. Each ask here delivers 100 batches."""
    src = await event_source()
    src.replay_limit = 100
    for i in range(350):
        await src.publish([store(prompt(i, 1))[0]], deliver=False)  # history only the replay has
    subscriber.add_engine(engine(src))
    await until(lambda: not subscriber.syncing())
    counters = subscriber.counters
    assert counters.batches_applied == 350 and subscriber.indexed_blocks == 350
    assert (counters.replays, counters.replay_resumes, counters.replay_failures) == (1, 3, 0)
    assert counters.lost_batches == 0
    after, _ = store(prompt(999))
    await src.publish([after])  # live events follow in sequence
    await until(lambda: held(subscriber.index, prompt(999)) == 4)
    assert counters.gaps == 0


async def test_a_replay_that_skips_batches_is_asked_again_from_the_hole(
    subscriber: KVEventSubscriber, event_source: MakeSource, until: Until
) -> None:
    """A full pipe drops a stretch, then delivers again: applying on past the hole lost it silently."""
    src = await event_source()
    src.replay_hole = range(120, 180)
    for i in range(300):
        await src.publish([store(prompt(i, 1))[0]], deliver=False)
    subscriber.add_engine(engine(src))
    await until(lambda: not subscriber.syncing())
    counters = subscriber.counters
    assert counters.batches_applied == 300 and subscriber.indexed_blocks == 300
    assert (counters.replay_resumes, counters.replay_failures, counters.lost_batches) == (1, 0, 0)
