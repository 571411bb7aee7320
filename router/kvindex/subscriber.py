"""The I/O edge of the block index: one ZMQ SUB per engine, replayed on connect and after gaps.

Each engine gets a task that subscribes to its KV-event PUB socket and applies batches to the
:class:`~kvstack.router.kvindex.index.KVIndex` strictly in sequence order. On connect, and on a
sequence gap, it asks the engine's ROUTER replay socket for the missing batches. While it
replays, live batches wait in the SUB socket's own receive queue (a high-water mark as large as
vLLM's), so nothing newer is applied before older history: a replayed block can never be
resurrected after a newer live ``BlockRemoved``. A sequence number that goes backwards means the
engine restarted: its entries are dropped and history is replayed from 0. Malformed messages are
counted and skipped; the loop never dies of one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import cast

import msgspec
import zmq
import zmq.asyncio
from pydantic import BaseModel, ConfigDict, Field
from zmq.utils.monitor import parse_monitor_message

from kvstack.common.kv_events import REPLAY_END, decode_batch, decode_seq, encode_seq
from kvstack.common.tasks import BackgroundTask
from kvstack.router.engines import EngineState
from kvstack.router.kvindex.index import KVIndex

log = logging.getLogger(__name__)
_CLOSE_TIMEOUT_S = 5.0
# batches applied before the feed yields to requests, live or replayed: a buffered ZMQ receive
# completes without yielding, and a replay of vLLM's whole buffer (10,000 steps) held a router's
# loop for seconds on the H200 (its /ready timed out)
_DRAIN_ROUND = 64


class SubscriberSettings(BaseModel):
    """Timing of the per-engine event feeds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replay_timeout_s: float = Field(2.0, gt=0.0)  # per message of a replay
    replay_stall_s: float = Field(0.5, gt=0.0)  # quiet this long mid-replay: its tail was dropped
    replay_cooldown_s: float = Field(5.0, ge=0.0)  # after a failed replay, live events only
    model_poll_s: float = Field(0.2, gt=0.0)  # until discovery learns the engine's model
    rcvhwm: int = Field(100_000, gt=0)  # vLLM's publisher hwm: hold live batches while replaying


@dataclass(slots=True)
class SubscriberCounters:
    """Plain counters the router exports as metrics."""

    batches_applied: int = 0
    gaps: int = 0  # a live batch arrived past the next expected sequence number
    replays: int = 0
    replay_failures: int = 0
    replay_resumes: int = 0  # a replay asked again where the engine's stream went quiet or skipped
    lost_batches: int = 0  # batches neither live nor replay could deliver
    malformed: int = 0
    resets: int = 0  # sequence went backwards: the engine restarted


def served_model(state: EngineState) -> str | None:
    """The model an engine's events are scoped by (its base model; None until discovery knows)."""
    bases = state.base_models  # an adapter's events carry its lora_name over the base model's scope
    if not bases:
        return None
    return min(bases)  # with several base models a stable pick


def _readable(sock: zmq.Socket[bytes]) -> bool:
    """A message is queued (reading EVENTS also re-arms the socket's FD)."""
    return bool(cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


def _receive(sock: zmq.Socket[bytes]) -> list[bytes] | None:
    """The next queued message, or None (per message cheaper than asking EVENTS first)."""
    try:
        return sock.recv_multipart(zmq.NOBLOCK)
    except zmq.Again:
        return None


class _Dropped(Exception):
    """A replay's stream skipped batches: the engine's socket dropped them."""


@dataclass(slots=True)
class _Progress:
    """One replay's progress over its asks."""

    first: int | None = None  # the first sequence number applied
    applied: int = 0


@dataclass(slots=True)
class _Feed:
    state: EngineState
    task: BackgroundTask | None = None  # None: the engine publishes no KV events
    next_seq: int | None = None  # None: nothing applied yet
    dup_floor: int = 0  # live batches in [dup_floor, next_seq) are replay duplicates
    cooldown_until: float = 0.0
    resync: bool = False  # reconnected: rebuild from the full history at the next chance
    synced: bool = False  # the first replay (the engine's history) is applied, or failed
    monitor_ready: bool = False  # the monitor socket signalled: read it at the next drain


class KVEventSubscriber:
    """Keeps ``index`` in sync with every engine's KV events."""

    def __init__(
        self,
        index: KVIndex,
        settings: SubscriberSettings | None = None,
        *,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.index = index
        self.settings = settings or SubscriberSettings()
        self._ctx = context or zmq.asyncio.Context.instance()
        # the same context, for plain sockets
        self._sync_ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.shadow(self._ctx.underlying)
        self._feeds: dict[str, _Feed] = {}
        self.counters = SubscriberCounters()

    @property
    def indexed_blocks(self) -> int:
        return self.index.indexed_blocks

    def engines(self) -> list[str]:
        return list(self._feeds)

    def syncing(self) -> list[str]:
        """Engines whose event history is not yet in the index: their first replay is under way, or
        the feed still waits to learn their model (router/readiness.py)."""
        return [url for url, feed in self._feeds.items() if feed.task is not None and not feed.synced]

    def add_engine(self, state: EngineState) -> None:
        """Start following ``state`` (call on the event loop when discovery adds an engine)."""
        url = state.url
        if url in self._feeds:
            self.remove_engine(url)
        ep = state.endpoint
        self.index.ensure_engine(
            url,
            model=served_model(state),
            block_size=state.block_size,
            num_gpu_blocks=state.num_gpu_blocks,
            events=ep.kv_events_endpoint is not None,
        )
        feed = _Feed(state)
        self._feeds[url] = feed
        if ep.kv_events_endpoint is not None:
            feed.task = BackgroundTask(f"kv-events {url}", functools.partial(self._run, feed), logger=log)
            feed.task.start()

    def remove_engine(self, url: str) -> None:
        """Stop following an engine that left and forget its blocks."""
        feed = self._feeds.pop(url, None)
        if feed is not None and feed.task is not None:
            feed.task.cancel()
        self.index.remove_engine(url)

    async def close(self) -> None:
        """Stop every feed and wait (boundedly) for their sockets to close."""
        tasks = [f.task for f in self._feeds.values() if f.task is not None]
        self._feeds.clear()
        await asyncio.gather(*(t.stop(grace=_CLOSE_TIMEOUT_S) for t in tasks))

    # -- one engine ----------------------------------------------------------------------------

    async def _run(self, feed: _Feed) -> None:
        state = feed.state
        # Discovery fills `models` in place without notifying anyone, so poll (cheaply) for it.
        while (model := served_model(state)) is None:  # noqa: ASYNC110
            await asyncio.sleep(self.settings.model_poll_s)
        self.index.ensure_engine(state.url, model=model, events=True)
        # Plain (not asyncio) sockets, drained on readiness: engines publish a batch per scheduler
        # step, and pyzmq's asyncio poller costs more per message than decoding and applying it
        # (profiled: three quarters of the feed's time on a busy router).
        sub = self._sync_ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, self.settings.rcvhwm)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        assert state.endpoint.kv_events_endpoint is not None
        # A reconnect may mean a new engine process whose first batches we never saw: the
        # monitor tells us, and a full replay then rebuilds the engine's entries from scratch.
        mon = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sub.connect(state.endpoint.kv_events_endpoint)
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()

        def monitor_ready() -> None:
            feed.monitor_ready = True
            wake.set()

        loop.add_reader(sub.fileno(), wake.set)
        loop.add_reader(mon.fileno(), monitor_ready)
        try:
            # Subscribe first, then replay: batches published meanwhile queue in `sub` and are
            # deduplicated by sequence number.
            feed.monitor_ready = True  # a connect may already be queued
            await self._replay(feed, 0)
            feed.synced = True
            while True:
                if await self._drain(feed, sub, mon):
                    await asyncio.sleep(0)  # a full round: let requests run before the next
                    continue
                # ZMQ's FD is edge-like: it signals new activity, not pending messages. `sub` just
                # read empty; reading EVENTS re-arms its FD, and nothing can slip in unseen between
                # here and the wait (no await in between). `mon` re-arms in its own drain.
                if _readable(sub) or feed.monitor_ready:
                    await asyncio.sleep(0)  # more arrived meanwhile: a steady stream never starves requests
                    continue
                wake.clear()
                await wake.wait()
        finally:
            loop.remove_reader(sub.fileno())
            loop.remove_reader(mon.fileno())
            sub.disable_monitor()
            mon.close(linger=0)
            sub.close(linger=0)

    async def _drain(self, feed: _Feed, sub: zmq.Socket[bytes], mon: zmq.Socket[bytes]) -> bool:
        """Handle what is queued; True when a full round was handled (more may be waiting)."""
        if feed.monitor_ready:  # rare: connects and disconnects
            feed.monitor_ready = False
            while (frames := _receive(mon)) is not None:
                event = parse_monitor_message(frames)["event"]
                if event == zmq.EVENT_DISCONNECTED:
                    feed.resync = True
                elif event == zmq.EVENT_CONNECTED and feed.resync:
                    await self._replay(feed, 0, rebuild=True)
            feed.monitor_ready = _readable(mon)  # re-arms its FD
        for _ in range(_DRAIN_ROUND):
            if (frames := _receive(sub)) is None:
                return False
            # Nearly every batch is the next in sequence: apply it without a coroutine per batch.
            if not self._apply_next(feed, frames):
                await self._on_live(feed, frames)
        return True

    def _apply_next(self, feed: _Feed, frames: list[bytes]) -> bool:
        """Apply ``frames`` when it is simply the next live batch; False leaves it to :meth:`_on_live`."""
        if len(frames) != 3 or len(frames[1]) != 8 or feed.resync:
            return False
        seq = decode_seq(frames[1])
        expected = feed.next_seq
        if expected is not None and seq != expected:
            return False
        self._apply(feed, seq, frames[2])
        feed.dup_floor = seq + 1  # live caught up: anything older now means a restart
        return True

    def _seq(self, frames: list[bytes]) -> int | None:
        """The sequence number of a ``[topic, seq, batch]`` message; None, counted, if malformed."""
        if len(frames) == 3:
            try:
                return decode_seq(frames[1])
            except ValueError:
                pass
        self.counters.malformed += 1
        return None

    async def _on_live(self, feed: _Feed, frames: list[bytes]) -> None:
        if (seq := self._seq(frames)) is None:
            return
        if feed.resync:  # the new process's first batches may have gone out before we reconnected
            await self._replay(feed, 0, rebuild=True)
        expected = feed.next_seq
        if expected is None or seq == expected:
            self._apply(feed, seq, frames[2])
        elif seq > expected:
            self.counters.gaps += 1
            await self._replay(feed, expected)
            after = feed.next_seq
            if after is None or seq >= after:  # the replay could not cover it
                self.counters.lost_batches += seq - (expected if after is None else after)
                self._apply(feed, seq, frames[2])
        elif seq >= feed.dup_floor:
            return  # already applied from a replay
        else:
            log.info("kv events from %s restarted at seq %d (expected %d)", feed.state.url, seq, expected)
            self.counters.resets += 1
            self.index.reset_engine(feed.state.url)
            feed.next_seq = None
            await self._replay(feed, 0)
            replayed_to = self._next(feed)
            if replayed_to is None or seq >= replayed_to:
                self._apply(feed, seq, frames[2])
        if feed.next_seq is not None and seq >= feed.next_seq - 1:
            feed.dup_floor = feed.next_seq  # live caught up: anything older now means a restart

    @staticmethod
    def _next(feed: _Feed) -> int | None:
        return feed.next_seq  # read through a call: a replay just moved it

    def _apply(self, feed: _Feed, seq: int, payload: bytes) -> None:
        feed.next_seq = seq + 1
        try:
            batch = decode_batch(payload)
        except (msgspec.DecodeError, ValueError):
            self.counters.malformed += 1
            return
        try:
            self.index.apply(feed.state.url, batch.events)
        except (ValueError, TypeError, OverflowError):  # e.g. token ids outside uint32
            log.warning("skipping a malformed KV-event batch %d from %s", seq, feed.state.url, exc_info=True)
            self.counters.malformed += 1
            return
        self.counters.batches_applied += 1

    async def _replay(self, feed: _Feed, start: int, *, rebuild: bool = False) -> None:
        """Apply buffered batches from ``start`` on, in order; on failure, go on with live events.

        ``rebuild``: when the engine's buffer holds its whole history (it starts at 0), drop the
        engine's entries and rebuild them from it (after a reconnect, to a possibly new process).

        The engine sends its whole buffer at once through a ROUTER socket, which drops what does not
        fit its pipe to us (vLLM keeps 10,000 batches, the pipe holds 1,000 by default): a replay
        that goes quiet part-way lost its tail and its end marker, one that skips sequence numbers
        lost a stretch. It is asked again from the first batch it lacks, for as long as each ask
        brings more.
        """
        replay_ep = feed.state.endpoint.kv_events_replay_endpoint
        if replay_ep is None or time.monotonic() < feed.cooldown_until:
            return
        self.counters.replays += 1
        progress = _Progress()
        ask = start
        while True:
            before = progress.applied
            try:
                await self._replay_from(feed, replay_ep, ask, rebuild, progress)
                break  # the end marker came
            except (TimeoutError, _Dropped):
                if progress.applied == before or feed.next_seq is None:
                    self.counters.replay_failures += 1
                    feed.cooldown_until = time.monotonic() + self.settings.replay_cooldown_s
                    log.warning("KV-event replay from %s failed: it timed out or skipped batches", replay_ep)
                    break
                self.counters.replay_resumes += 1
                ask = feed.next_seq
        feed.dup_floor = start if progress.first is None else min(progress.first, start)

    async def _replay_from(
        self, feed: _Feed, endpoint: str, ask: int, rebuild: bool, progress: _Progress
    ) -> None:
        """One ask, from ``ask`` on, until the end marker; TimeoutError when nothing comes or the
        stream goes quiet part-way, :class:`_Dropped` when it skips batches."""
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVHWM, self.settings.rcvhwm)  # our side of the pipe drops nothing
        dealer.connect(endpoint)
        timeout, started = self.settings.replay_timeout_s, False
        try:
            # A DEALER's send waits for a connected peer: bound it too, or an engine whose replay
            # socket is gone would stall this feed (and its live events) forever. asyncio.timeout,
            # not wait_for: Python 3.11's wait_for can swallow a cancellation that arrives as the
            # receive completes, and the feed then outlives close() (a test hung on exactly that).
            async with asyncio.timeout(timeout):
                await dealer.send_multipart([b"", encode_seq(ask)])
            while True:
                async with asyncio.timeout(self.settings.replay_stall_s if started else timeout):
                    frames = await dealer.recv_multipart()
                if len(frames) == 3 and frames[1] == REPLAY_END:
                    return
                if (seq := self._seq(frames)) is None:
                    continue
                if progress.first is None and rebuild and seq == 0:
                    feed.resync = False
                    if feed.next_seq is not None:
                        self.counters.resets += 1
                        self.index.reset_engine(feed.state.url)
                        feed.next_seq = None
                if feed.next_seq is not None and seq < feed.next_seq:
                    continue
                if not started:
                    started = True
                    if seq > ask:  # the engine's buffer no longer reaches back to `ask`
                        self.counters.lost_batches += seq - ask
                elif feed.next_seq is not None and seq > feed.next_seq:
                    raise _Dropped  # a hole: the pipe was full for a while; ask again from it
                if progress.first is None:
                    progress.first = seq
                self._apply(feed, seq, frames[2])
                progress.applied += 1
                if progress.applied % _DRAIN_ROUND == 0:
                    await asyncio.sleep(0)
        finally:
            dealer.close(linger=0)
