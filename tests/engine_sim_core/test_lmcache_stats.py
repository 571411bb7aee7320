"""LMCache's own stats (``lmcache:*``) as the core reports them: counts of the real tiers, times of
the latency model."""

from __future__ import annotations

import pytest
from tests.redis_server import RedisServer

from kvstack.common.config import build
from kvstack.engine.sim.config import KV_BYTES_PER_TOKEN, SimConfig
from kvstack.engine.sim.core import SimEngine
from kvstack.engine.sim.latency import retrieve_time, store_time
from kvstack.engine.sim.types import SimRequest

from .conftest import Recorder

PROMPT = [300 + (i * 37) % 9000 for i in range(2048)]  # 8 LMCache chunks of 256
CHUNK_BYTES = 256 * KV_BYTES_PER_TOKEN


def lm_config(redis_url: str | None, **lmcache: object) -> SimConfig:
    return build(
        SimConfig,
        "test config",
        speed=50.0,
        hash_seed=7,
        lmcache={"enabled": True, "remote_url": redis_url, "remote_retry_s": 0.2, **lmcache},
    )


async def run(engine: SimEngine, rid: str, prompt: list[int]) -> None:
    async for _ in engine.generate(SimRequest(rid, prompt, 2, ignore_eos=True)):
        pass


async def prompt_on_two_pods(cfg: SimConfig) -> tuple[Recorder, Recorder]:
    """PROMPT on pod a, its stores flushed to Redis, then PROMPT on pod b; each pod's stats."""
    rec_a, rec_b = Recorder(), Recorder()
    a, b = SimEngine(cfg, rec_a), SimEngine(cfg, rec_b)
    await a.start()
    await b.start()
    try:
        await run(a, "a", PROMPT)
        assert a.lmcache is not None and a.lmcache.remote is not None
        await a.lmcache.remote.flush()
        await run(b, "b", PROMPT)
    finally:
        await a.stop()
        await b.stop()
    return rec_a, rec_b


async def test_a_prefix_stored_by_one_pod_is_retrieved_by_another_through_redis(
    redis_server: RedisServer,
) -> None:
    cfg = lm_config(redis_server.url)
    rec_a, rec_b = await prompt_on_two_pods(cfg)
    # The first pod found nothing, so it retrieved nothing and stored all 8 chunks.
    assert rec_a.lmcache_retrieves == []
    assert sum(tokens for tokens, _ in rec_a.lmcache_stores) == 2048
    for tokens, seconds in rec_a.lmcache_stores:
        assert seconds == store_time(cfg, tokens) / 50.0 > 0
    assert rec_a.lmcache_cpu_bytes[-1] == 8 * CHUNK_BYTES
    # The second asked Redis for all but the last token and got them back; it stores nothing new,
    # and the chunks it fetched now sit in its CPU tier.
    assert rec_b.lmcache_retrieves == [(2047, 2047, retrieve_time(cfg, 0, 2047) / 50.0)]
    assert rec_b.lmcache_retrieves[0][2] > 0
    assert rec_b.lmcache_stores == []
    assert rec_b.lmcache_cpu_bytes[-1] == 8 * CHUNK_BYTES


async def test_a_failed_remote_load_is_requested_but_not_hit(redis_server: RedisServer) -> None:
    """Redis lost the KV behind every key: the retrieve asks for the tokens and gets none back."""
    _, rec_b = await prompt_on_two_pods(lm_config(redis_server.url, remote_load_failure=1.0))
    assert [(asked, hit) for asked, hit, _ in rec_b.lmcache_retrieves] == [(2047, 0)]


@pytest.mark.parametrize("local_cpu_gb", [5.0, 0.0])
async def test_the_cpu_tier_serves_a_repeat_after_a_gpu_reset(local_cpu_gb: float) -> None:
    rec = Recorder()
    engine = SimEngine(lm_config(None, local_cpu_gb=local_cpu_gb), rec)
    await engine.start()
    try:
        await run(engine, "a", PROMPT)
        assert engine.reset_prefix_cache()
        await run(engine, "b", PROMPT)
    finally:
        await engine.stop()
    if local_cpu_gb:
        assert [(asked, hit) for asked, hit, _ in rec.lmcache_retrieves] == [(2047, 2047)]
        assert rec.lmcache_cpu_bytes[-1] == 8 * CHUNK_BYTES
    else:  # no CPU tier and no Redis: LMCache holds nothing, so nothing is retrieved
        assert rec.lmcache_retrieves == []
        assert set(rec.lmcache_cpu_bytes) == {0}
