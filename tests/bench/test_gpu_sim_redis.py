"""`kvstack bench gpu --sim-redis`: the simulators it starts share KV through a real Redis."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import redis
from tests.conftest import free_port
from tests.redis_server import RedisServer

from kvstack.bench import promtext
from kvstack.bench.gpu_procs import sim_procs
from kvstack.bench.gpu_summary import ENGINE_COUNTERS
from kvstack.common.procs import running
from kvstack.common.waits import wait_until

MODEL = "kvstack-8b"
DOCUMENT = " ".join(f"clause {i} of the shared contract binds party {i % 7}." for i in range(300))


def ask(url: str) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": DOCUMENT}, {"role": "user", "content": "Summarize."}],
        "max_tokens": 2,
        "ignore_eos": True,
    }
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


def test_the_simulators_share_lmcache_chunks_through_redis(tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    try:
        procs, entries = sim_procs(2, MODEL, None, tmp_path, None, server.url)
        urls = [e["url"] for e in entries]
        with running(procs, timeout=60):
            ask(urls[0])
            client = redis.Redis.from_url(server.url)
            try:
                wait_until(lambda: client.dbsize() > 0, "sim0's chunks in Redis", 10.0)
            finally:
                client.close()
            before = promtext.scrape(f"{urls[1]}/metrics")
            ask(urls[1])
            after = promtext.scrape(f"{urls[1]}/metrics")
        # the second simulator loaded the first one's prompt from Redis: one hash seed, one store
        assert promtext.delta(before, after, ENGINE_COUNTERS["external_hits"]) > 0
    finally:
        server.kill()


@pytest.mark.parametrize("tier_events", [True, False])
def test_the_simulators_send_lmcache_tier_events_or_only_gpu_ones_as_the_real_engines(
    tmp_path: Path, tier_events: bool
) -> None:
    procs, _ = sim_procs(2, MODEL, None, tmp_path, None, "redis://127.0.0.1:1", tier_events=tier_events)
    flag = "--lmcache-kv-events" if tier_events else "--no-lmcache-kv-events"
    assert all(flag in p.argv and "--lmcache" in p.argv for p in procs)
