"""LMCache tiers: the pure load plan, the CPU LRU, and the shared tier in a real redis-server."""

from __future__ import annotations

import asyncio
import gzip
import logging
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml
from tests.redis_server import RedisServer

from kvstack.common.blocks import block_keys, chain_root
from kvstack.common.config import ConfigError, build
from kvstack.common.kv_events import BlockRemoved, BlockStored, KVEvent
from kvstack.engine.sim.config import LMCacheConfig, SimConfig
from kvstack.engine.sim.core import SimEngine
from kvstack.engine.sim.fit import retrieve_fit
from kvstack.engine.sim.latency import StepWork, engine_step_time, load_time
from kvstack.engine.sim.lmcache import (
    TIER_CPU,
    TIER_FAILED,
    TIER_REMOTE,
    ChunkRun,
    CpuTier,
    ExternalPlan,
    LMCacheConnector,
    chunk_hashes,
    lmcache_root,
    lost_in_store,
    plan_external,
    remote_tiers,
)
from kvstack.engine.sim.types import SimRequest
from kvstack.router.kvindex.index import IndexSettings, KVIndex, PrefixMatch

from .conftest import Recorder

C, R, F = TIER_CPU, TIER_REMOTE, TIER_FAILED
ROOT = Path(__file__).resolve().parents[2]


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
        # a chunk whose KV is gone: loaded in vain from there on, then computed
        (0, [C, R, F, F], 1024, ExternalPlan(cpu_tokens=256, remote_tokens=256, failed_tokens=511)),
        (0, [F, F], 1024, ExternalPlan(failed_tokens=512)),
        (512, [C, R, F], 1024, ExternalPlan(failed_tokens=256)),  # the GPU holds what came before
        (768, [C, R, F], 1024, ExternalPlan()),  # ... or everything: nothing is asked of Redis
    ],
)
def test_plan_external(gpu_hit: int, tiers: list[int], num_tokens: int, expected: ExternalPlan) -> None:
    assert plan_external(gpu_hit, tiers, 256, num_tokens) == expected


def test_a_failed_load_costs_every_token_asked_for() -> None:
    plan = ExternalPlan(cpu_tokens=256, remote_tokens=256, failed_tokens=511)
    assert plan.tokens == 512  # what the engine skips computing
    assert plan.remote_load_tokens == 767  # what the remote load costs


def test_lost_chunks_are_a_fixed_draw_at_the_configured_rate() -> None:
    hashes = chunk_hashes([7 + i % 5000 for i in range(256 * 4000)], 256, 11)
    lost = [h for h in hashes if lost_in_store(h, 0.124)]
    assert 0.10 < len(lost) / len(hashes) < 0.15
    assert lost == [h for h in hashes if lost_in_store(h, 0.124)]  # the same chunks every time
    assert not any(lost_in_store(h, 0.0) for h in hashes)
    assert all(lost_in_store(h, 1.0) for h in hashes)


def test_remote_tiers_fail_from_the_first_lost_chunk_on() -> None:
    hashes = chunk_hashes([3 + i % 4000 for i in range(256 * 200)], 256, 5)
    first = next(i for i, h in enumerate(hashes) if lost_in_store(h, 0.2))
    assert remote_tiers(hashes, 0.2) == [R] * first + [F] * (len(hashes) - first)
    assert remote_tiers(hashes, 0.0) == [R] * len(hashes)


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


async def test_a_lost_remote_chunk_is_loaded_in_vain_then_recomputed(redis_server: RedisServer) -> None:
    """Redis lost every chunk's KV but kept the keys: the second pod's lookup finds them, its load
    comes back empty, and it recomputes the whole prompt after paying the load
    (kv_load_failure_policy: recompute); the request still finishes with all its tokens."""
    loads = {"remote_load_us_per_token": 300.0, "remote_load_failure": 1.0}
    rec_a, rec_b, rec_c = Recorder(), Recorder(), Recorder()
    a = SimEngine(lm_config(redis_server.url, seed=0, speed=1.0, **loads), rec_a)
    b = SimEngine(lm_config(redis_server.url, seed=0, speed=1.0, **loads), rec_b)
    cold = SimEngine(lm_config(None, seed=0, speed=1.0), rec_c)
    for engine in (a, b, cold):
        await engine.start()
    try:
        await run(a, "a", PROMPT)
        assert a.lmcache is not None and a.lmcache.remote is not None
        await a.lmcache.remote.flush()
        assert await run(b, "b", PROMPT, max_tokens=4) == 4
        assert await run(cold, "c", PROMPT) == 2
        assert rec_b.prompt_sources == [(2048, 0, 0)]  # nothing came back: all computed
        ttft_b, ttft_cold = rec_b.finished[0].ttft, rec_c.finished[0].ttft
        assert ttft_b is not None and ttft_cold is not None
        # 2,047 tokens asked of Redis at 300 us each: ~0.6 s on top of the cold prefill
        assert ttft_b > ttft_cold + 0.5
    finally:
        for engine in (a, b, cold):
            await engine.stop()


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


RETRIEVED = (
    "[req_id=chatcmpl-x] Retrieved {got} out of {asked} required tokens (from 9000 total tokens). "
    "size: 0.1 gb, cost {ms} ms, throughput: {gbs} GB/s; (cache_engine.py:958:lmcache.v1.cache_engine)"
)


def test_retrieve_fit_splits_the_tiers_by_throughput_and_counts_failed_chunks() -> None:
    lines = [
        RETRIEVED.format(got=256, asked=256, ms=1.0, gbs=30.0),  # CPU: 3.9 us/token
        RETRIEVED.format(got=512, asked=512, ms=3.0, gbs=20.0),  # CPU: 5.9 us/token
        RETRIEVED.format(got=1024, asked=1024, ms=307.2, gbs=0.4),  # Redis: 300 us/token, 4 chunks read
        RETRIEVED.format(got=256, asked=1024, ms=409.6, gbs=0.08),  # Redis: 400 us/token, 1 read, 1 failed
        RETRIEVED.format(got=0, asked=512, ms=256.0, gbs=0.0),  # Redis: nothing read, 1 failed
        "Stored 512 out of total 512 tokens. size: 0.0625 GB, cost 3.6 ms; offload_time: 3.5 ms",
    ]
    fit = retrieve_fit(lines)
    assert (fit.cpu_points, fit.remote_points) == (2, 3)
    assert fit.cpu_us_per_token == pytest.approx((1000 / 256 + 3000 / 512) / 2)
    assert fit.remote_us_per_token == pytest.approx(400.0)  # the median of 300, 400, 500
    assert fit.remote_failure == pytest.approx((768 + 512) / 2560)
    assert fit.remote_chunk_failure == pytest.approx(2 / (4 + 1 + 0 + 2))


def test_the_shared_gpu_yaml_carries_the_load_fit_of_the_committed_logs() -> None:
    logs = sorted((ROOT / "bench-results" / "gpu").glob("h200-*-engine*.log.gz"))
    assert logs
    lines: list[str] = []
    for path in logs:
        with gzip.open(path, "rt", errors="replace") as f:
            lines.extend(f)
    fit = retrieve_fit(lines)
    cfg = SimConfig(**yaml.safe_load((ROOT / "bench-results" / "gpu" / "sim-h200-shared.yaml").read_text()))
    lm = cfg.lmcache
    assert lm.cpu_load_us_per_token == pytest.approx(fit.cpu_us_per_token, rel=0.05)
    assert lm.remote_load_us_per_token == pytest.approx(fit.remote_us_per_token, rel=0.05)
    # one simulated chunk stands for token_cost_scale real ones: it fails if any of them does
    per_sim_chunk = 1 - (1 - fit.remote_chunk_failure) ** cfg.token_cost_scale
    assert lm.remote_load_failure == pytest.approx(per_sim_chunk, abs=0.005)
    # the connector's load terms of the reference fit are replaced, not added to
    assert cfg.latency.lmcache_remote_load_s == cfg.latency.lmcache_remote_load_per_token_s == 0


def test_loads_are_charged_to_their_step_at_real_tokens_outside_the_gpu_share() -> None:
    base = {"token_cost_scale": 2.0, "gpu_share": 0.5}
    lm = {"cpu_load_us_per_token": 4.0, "remote_load_us_per_token": 300.0}
    plain = SimConfig(**base)
    loaded = SimConfig(**base, lmcache=lm)
    work = StepWork(prefill_tokens=100, cpu_load_tokens=1000, remote_load_tokens=500)
    extra = engine_step_time(loaded, work) - engine_step_time(plain, work)
    # plain still charges the reference load terms; the new ones add 2x tokens x us, undivided
    assert extra == pytest.approx(1e-6 * (4.0 * 2000 + 300.0 * 1000))
    assert load_time(4.0, 300.0, StepWork()) == 0.0
