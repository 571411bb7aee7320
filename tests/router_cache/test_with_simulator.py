"""cache_aware end to end against real simulator processes publishing vLLM 0.24 KV events."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import openai
import pytest
from tests.conftest import free_port

from kvstack.common import tokenizer
from kvstack.common.procs import ManagedProcess
from kvstack.engine.sim.cli import kv_events_flags
from kvstack.router.engines import Endpoint, EngineRegistry
from kvstack.router.kvindex.keys import request_root
from kvstack.router.policies.base import RequestFeatures
from kvstack.router.policies.cache_aware import make_policy

KVSTACK = Path(sys.executable).parent / "kvstack"
MODEL = "sim-model"
BS = 16
Until = Callable[[Callable[[], bool]], Awaitable[None]]

pytestmark = pytest.mark.slow


def sim(tmp: Path, port: int, pub: int, replay: int) -> ManagedProcess:
    argv = [
        str(KVSTACK), "engine", "sim", "--port", str(port), "--served-model-name", MODEL,
        "--speed", "50", "--max-model-len", "4096", "--num-gpu-blocks", "2000", "--block-size", str(BS),
        *kv_events_flags(pub, replay),
    ]  # fmt: skip
    return ManagedProcess("sim", argv, tmp, ready_url=f"http://127.0.0.1:{port}/health")


async def test_simulator_events_drive_routing_and_restarts_clear(tmp_path: Path, until: Until) -> None:
    port, pub, replay = free_port(), free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    registry = EngineRegistry()
    registry.sync(
        [
            Endpoint(
                url,
                "sim",
                frozenset({MODEL}),
                kv_events_endpoint=f"tcp://127.0.0.1:{pub}",
                kv_events_replay_endpoint=f"tcp://127.0.0.1:{replay}",
            ),
            Endpoint("http://127.0.0.1:9", "idle", frozenset({MODEL})),  # never called: a rival
        ]
    )
    policy = make_policy(registry=registry)
    proc = sim(tmp_path, port, pub, replay)
    texts = [f"Document {i}: " + "the router keeps every block it can see. " * 40 for i in range(2)]
    tokens = [tokenizer.encode(t) for t in texts]  # completions: no BOS, as the proxy tokenizes
    full = [len(t) // BS for t in tokens]
    keys = [policy.keys.keys(t, BS, request_root(MODEL, None, None)) for t in tokens]

    def held(i: int) -> int:
        return policy.index.match(url, keys[i], time.monotonic() + 60).gpu_blocks  # past any TTL

    async def complete(i: int) -> None:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused") as client:
            await client.completions.create(model=MODEL, prompt=texts[i], max_tokens=2)

    try:
        await asyncio.to_thread(lambda: proc.start().wait_ready(30))
        await policy.start()
        await complete(0)
        await until(lambda: held(0) == full[0])
        now = time.monotonic()
        d = policy.choose(
            RequestFeatures(MODEL, "q1", prompt_token_ids=tokens[0]), registry.candidates(MODEL, now), now
        )
        assert (d.engine.url, d.reason, d.predicted_hit_tokens) == (url, "cache_hit", full[0] * BS)

        async with httpx.AsyncClient() as http:
            assert (await http.post(f"{url}/reset_prefix_cache")).status_code == 200
        await until(lambda: held(0) == 0)  # AllBlocksCleared

        await complete(0)
        await until(lambda: held(0) == full[0])
        await asyncio.to_thread(proc.stop)
        proc = sim(tmp_path, port, pub, replay)
        await asyncio.to_thread(lambda: proc.start().wait_ready(30))
        await complete(1)  # the new process's first events: the old ones must not survive
        await until(lambda: held(1) == full[1])
        assert held(0) == 0
        assert policy.subscriber.counters.resets >= 1
        assert policy.subscriber.counters.malformed == 0
    finally:
        await policy.stop()
        await asyncio.to_thread(proc.stop)
