"""LMCache tiers: the pure load plan, the CPU LRU, and the shared tier in a real redis-server."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.asyncio as aioredis

from kvstack.common.blocks import block_keys, chain_root
from kvstack.common.config import ConfigError, build
from kvstack.common.kv_events import BlockRemoved, BlockStored, KVEvent
from kvstack.engine.sim.config import LMCacheConfig, SimConfig
from kvstack.engine.sim.core import SimEngine
from kvstack.engine.sim.lmcache import (
    TIER_CPU,
    TIER_REMOTE,
    ChunkRun,
    CpuTier,
    ExternalPlan,
    LMCacheConnector,
    chunk_hashes,
    lmcache_root,
    plan_external,
)
from kvstack.engine.sim.types import SimRequest
from kvstack.router.kvindex.index import IndexSettings, KVIndex, PrefixMatch

from .conftest import Recorder, RedisServer

C, R = TIER_CPU, TIER_REMOTE


@pytest.mark.parametrize(
    ("gpu_hit", "tiers", "num_tokens", "expected"),
    [
        (0, [], 1024, ExternalPlan()),  # nothing stored
        (0, [C, C], 1024, ExternalPlan(cpu_tokens=512)),
        (0, [C, R, R], 1024, ExternalPlan(cpu_tokens=256, remote_tokens=512)),
        (256, [C, R], 1024, ExternalPlan(remote_tokens=256)),  # the GPU already has chunk 0
        (512, [C, R], 1024, ExternalPlan()),  # GPU hit covers everything LMCache has
        (320, [C, R], 1024, ExternalPlan(remote_tokens=192)),  # starts inside a chunk
        (0, [R, R, R, R], 1024, ExternalPlan(remote_tokens=1023)),  # full hit gives back the last token
        (0, [C], 300, ExternalPlan(cpu_tokens=256)),  # the partial tail chunk is computed
    ],
)
def test_plan_external(gpu_hit: int, tiers: list[int], num_tokens: int, expected: ExternalPlan) -> None:
    assert plan_external(gpu_hit, tiers, 256, num_tokens) == expected


def test_chunk_hashes_chain_and_depend_on_the_seed() -> None:
    tokens = list(range(1000))
    a = chunk_hashes(tokens, 256, lmcache_root(0, "m", None, None))
    assert len(a) == 3  # 1000 tokens: three full chunks
    assert a == chunk_hashes(tokens[:768], 256, lmcache_root(0, "m", None, None))
    assert set(a).isdisjoint(chunk_hashes(tokens, 256, lmcache_root(1, "m", None, None)))
    assert set(a).isdisjoint(chunk_hashes(tokens, 256, lmcache_root(0, "m", "lora", None)))
    assert chunk_hashes(tokens[:255], 256, 1) == []


def test_cpu_tier_is_lru_and_sized_by_bytes() -> None:
    # 5 GB at 256 tokens x 128 KiB per chunk: 149 chunks, as LMCache's 5 GB default holds for 8B.
    assert CpuTier.for_config(LMCacheConfig(local_cpu_gb=5)).capacity == 149
    tier = CpuTier(3)
    tier.put([1, 2, 3])
    assert tier.leading([1, 2, 9, 3]) == 2  # refreshes 1 and 2
    assert tier.put([4]) == [3]  # evicts 3, the least recently used
    assert 3 not in tier and len(tier) == 3 and tier.evictions == 1
    assert tier.put([5, 6]) == [1, 2]
    zero = CpuTier(0)
    assert zero.put([1]) == []
    assert len(zero) == 0


def lm_config(
    redis_url: str | None, *, seed: int, local_cpu_gb: float = 5.0, speed: float = 50.0, **kw: object
) -> SimConfig:
    return build(
        SimConfig,
        "test config",
        speed=speed,
        hash_seed=seed,
        lmcache={
            "enabled": True,
            "remote_url": redis_url,
            "local_cpu_gb": local_cpu_gb,
            "remote_retry_s": 0.2,
            **kw,
        },
    )


async def run(engine: SimEngine, rid: str, prompt: list[int], max_tokens: int = 2) -> int:
    n = 0
    async for out in engine.generate(SimRequest(rid, prompt, max_tokens, ignore_eos=True)):
        n += len(out.new_token_ids)
    return n


PROMPT = [300 + (i * 37) % 9000 for i in range(2048)]


async def test_remote_store_round_trip(redis_server: RedisServer) -> None:
    cfg = LMCacheConfig(enabled=True, remote_url=redis_server.url, remote_ttl_s=120)
    conn = LMCacheConnector(cfg, "m", seed=3)
    conn.start()
    try:
        hashes = chunk_hashes(PROMPT, 256, conn.root(None, None))
        assert await conn.lookup(hashes) == []
        conn.store(ChunkRun(hashes, PROMPT, 0, 5))
        assert conn.remote is not None
        await conn.remote.flush()
        assert conn.remote.stored_chunks == 5
        # A second connector (another pod) sees the chunks in Redis only.
        other = LMCacheConnector(cfg, "m", seed=3)
        try:
            assert await other.lookup(hashes) == [R] * 5
            assert await other.lookup(hashes) == [C] * 5  # fetched chunks land in its CPU tier
        finally:
            await other.stop()
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            key = conn.remote.key(hashes[0])
            assert key.startswith("kvstack:lmcache:m@")
            assert await client.get(key) == b"1"
            assert 0 < await client.ttl(key) <= 120
        finally:
            await client.aclose()
    finally:
        await conn.stop()


async def remote_hit_tokens(first: SimEngine, second: SimEngine, rec: Recorder) -> int:
    await run(first, "a", PROMPT)
    assert first.lmcache is not None and first.lmcache.remote is not None
    await first.lmcache.remote.flush()
    await run(second, "b", PROMPT)
    return rec.prompt_sources[-1][2]


@pytest.mark.parametrize(("seed_a", "seed_b", "shared"), [(0, 0, True), (0, 1, False)])
async def test_two_pods_share_kv_through_redis_only_with_the_same_seed(
    redis_server: RedisServer, seed_a: int, seed_b: int, shared: bool
) -> None:
    rec_a, rec_b = Recorder(), Recorder()
    # Real time, so the modelled TTFTs dwarf real overheads (a Redis round trip, a busy host).
    a = SimEngine(lm_config(redis_server.url, seed=seed_a, speed=1.0), rec_a)
    b = SimEngine(lm_config(redis_server.url, seed=seed_b, speed=1.0), rec_b)
    await a.start()
    await b.start()
    try:
        external = await remote_hit_tokens(a, b, rec_b)
        assert rec_a.prompt_sources == [(2048, 0, 0)]
        if shared:
            assert external == 2047  # everything but the last token, loaded from Redis
            assert rec_b.external_queries == [(2048, 2047)]
            ttft_a, ttft_b = rec_a.finished[0].ttft, rec_b.finished[0].ttft
            assert ttft_a is not None and ttft_b is not None and ttft_b < ttft_a / 1.5
            assert rec_b.finished[0].prefill_kv_computed_tokens == 1
        else:
            assert external == 0
            assert rec_b.prompt_sources == [(2048, 0, 0)]
    finally:
        await a.stop()
        await b.stop()


async def test_cpu_tier_serves_after_the_gpu_cache_is_reset() -> None:
    rec = Recorder()
    engine = SimEngine(lm_config(None, seed=0), rec)
    await engine.start()
    try:
        await run(engine, "a", PROMPT)
        assert engine.reset_prefix_cache()
        await run(engine, "b", PROMPT)
        assert rec.prompt_sources == [(2048, 0, 0), (1, 0, 2047)]
    finally:
        await engine.stop()


async def test_engine_keeps_serving_when_redis_dies_and_recovers(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    engine = SimEngine(lm_config(redis_server.url, seed=0, local_cpu_gb=0.0), rec)
    await engine.start()
    remote = engine.lmcache.remote if engine.lmcache else None
    assert remote is not None
    try:
        caplog.set_level(logging.WARNING, logger="kvstack.engine.sim.lmcache")
        await run(engine, "before", PROMPT)
        await remote.flush()
        redis_server.kill()
        engine.reset_prefix_cache()
        # Redis is gone: every request is recomputed, none fails, and the outage is logged once.
        for i in range(4):
            assert await run(engine, f"down{i}", [*PROMPT[:-1], i]) == 2
        assert rec.prompt_sources[-1][2] == 0
        assert remote.failures >= 1
        assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
        # Back up (empty): after the retry delay the engine stores and shares again.
        redis_server.start()
        await asyncio.sleep(0.3)
        await run(engine, "after", [7, *PROMPT[1:]])
        await remote.flush()
        engine.reset_prefix_cache()
        await run(engine, "again", [7, *PROMPT[1:]])
        assert rec.prompt_sources[-1] == (1, 0, 2047)
    finally:
        await engine.stop()


async def test_unreachable_redis_at_start_is_not_fatal() -> None:
    from tests.conftest import free_port

    rec = Recorder()
    engine = SimEngine(lm_config(f"redis://127.0.0.1:{free_port()}", seed=0), rec)
    await engine.start()
    try:
        assert await run(engine, "a", PROMPT) == 2
        assert await run(engine, "b", [*PROMPT[:-1], 5]) == 2
        assert engine.lmcache is not None and engine.lmcache.remote is not None
        assert engine.lmcache.remote.failures >= 1
    finally:
        await engine.stop()


# --- KV events of the CPU tier --------------------------------------------------------------------

CS = 4  # a tiny chunk size keeps the event fields readable


def events_connector(capacity: int, *, events: bool = True, removed: bool = False) -> LMCacheConnector:
    cfg = LMCacheConfig(enabled=True, chunk_size=CS, kv_events=events, kv_events_removed=removed)
    conn = LMCacheConnector(cfg, "m", seed=0)
    conn.cpu.capacity = capacity
    return conn


TOKENS = list(range(100, 116))  # 4 chunks
HASHES = chunk_hashes(TOKENS, CS, lmcache_root(0, "m", None, None))


def stored(i: int) -> BlockStored:
    """The event LMCache makes for chunk ``i`` of TOKENS."""
    return BlockStored(
        block_hashes=[HASHES[i]],
        parent_block_hash=HASHES[i - 1] if i else None,
        token_ids=TOKENS[i * CS : (i + 1) * CS],
        block_size=CS,
        lora_id=None,
        medium="cpu",
        lora_name=None,
        extra_keys=None,
        group_idx=0,
        kv_cache_spec_kind="full_attention",
    )


def test_each_stored_chunk_is_one_cpu_block_stored_event() -> None:
    conn = events_connector(8)
    conn.store(ChunkRun(HASHES, TOKENS, 0, 2))
    conn.store(ChunkRun(HASHES, TOKENS, 2, 4))
    assert conn.take_events() == [stored(0), stored(1), stored(2), stored(3)]
    assert conn.take_events() == []
    assert all(0 <= h < 2**64 for h in HASHES)
    conn.store(ChunkRun(HASHES, TOKENS, 0, 4))  # held already: LMCache skips them, events too
    assert conn.take_events() == []


@pytest.mark.parametrize(
    ("removed", "expected"),
    [
        (False, [stored(2), stored(3)]),  # LMCache 0.5.3: stores only
        (True, [stored(2), stored(3), BlockRemoved(block_hashes=HASHES[:2], medium="cpu")]),
    ],
)
def test_cpu_evictions_are_reported_only_when_asked(removed: bool, expected: list[KVEvent]) -> None:
    conn = events_connector(2, removed=removed)
    conn.store(ChunkRun(HASHES, TOKENS, 0, 2))
    conn.take_events()
    conn.store(ChunkRun(HASHES, TOKENS, 2, 4))  # a full tier: chunks 0 and 1 go
    assert conn.take_events() == expected


def test_no_events_by_default_or_without_a_cpu_tier() -> None:
    for conn in (events_connector(8, events=False), events_connector(0)):
        conn.store(ChunkRun(HASHES, TOKENS, 0, 4))
        assert conn.take_events() == []


def test_removed_events_need_stored_events() -> None:
    with pytest.raises(ConfigError, match="kv_events_removed"):
        build(SimConfig, "test config", lmcache={"enabled": True, "kv_events_removed": True})


async def test_engine_publishes_cpu_chunks_with_its_own_blocks_and_the_router_indexes_them() -> None:
    batches: list[list[KVEvent]] = []
    engine = SimEngine(
        lm_config(None, seed=0, kv_events=True), Recorder(), lambda evs: batches.append(list(evs))
    )
    await engine.start()
    try:
        await run(engine, "a", PROMPT)
        cpu = [e for b in batches for e in b if isinstance(e, BlockStored) and e.medium == "cpu"]
        gpu = [e for b in batches for e in b if isinstance(e, BlockStored) and e.medium == "GPU"]
        assert [e.token_ids for e in cpu] == [PROMPT[i : i + 256] for i in range(0, 2048, 256)]
        assert [e.parent_block_hash for e in cpu] == [None, *(e.block_hashes[0] for e in cpu[:-1])]
        assert {e.block_size for e in cpu} == {256} and {e.block_size for e in gpu} == {16}
        # a chunk is published in the same batch as the GPU blocks of the step that computed it
        first = next(b for b in batches if any(e in cpu for e in b))
        assert any(isinstance(e, BlockStored) and e.medium == "GPU" for e in first)
        # the router: after a GPU reset the engine still serves the prompt from its CPU tier
        index = KVIndex(IndexSettings(shared_store=False))
        index.ensure_engine("e", model=engine.config.model, block_size=16)
        for b in batches:
            index.apply("e", b)
        keys = block_keys(PROMPT, 16, chain_root(engine.config.model))
        assert index.match("e", keys, 0.0) == PrefixMatch(16, 128, 128, 128)
        assert engine.reset_prefix_cache()
        index.apply("e", batches[-1])
        assert index.match("e", keys, 0.0) == PrefixMatch(16, 0, 128, 128)
    finally:
        await engine.stop()
