"""A router that missed part of an engine's KV-event stream replays it and ends up with the same index.

Real processes: one simulator publishing vLLM 0.24 KV events over ZMQ, two cache-aware routers. The
first hears every batch live; the second starts after the engine has published (everything before
its connection is missing) and must recover it from the engine's replay socket. Mid-stream gaps
(lost live batches) are covered against a real ZMQ publisher that drops batches, in
tests/router_cache/test_subscriber.py::test_a_gap_is_replayed_and_converges_to_the_full_stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml
from tests.conftest import free_port
from tests.router.conftest import FAST_MONITOR, RouterFactory

from kvstack.common.procs import ManagedProcess, running
from kvstack.common.waits import wait_until
from kvstack.engine.sim.cli import kv_events_flags
from kvstack.router.discovery.static import sim_engine_entry

from .conftest import KVSTACK

MODEL = "sim-events"
BLOCKS = "kvstack_router_kv_index_blocks"

pytestmark = pytest.mark.slow


def _index(r: object) -> float:
    return r.metric(BLOCKS)  # type: ignore[attr-defined, no-any-return]


def _settle(read: Callable[[], float], timeout: float = 15.0) -> float:
    """The value once it stopped changing for half a second."""
    last, since = read(), time.monotonic()

    def held_still() -> tuple[float] | None:
        nonlocal last, since
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        return (now,) if time.monotonic() - since >= 0.5 else None  # in a tuple: 0 is a value too

    (value,) = wait_until(held_still, "the value to hold still for 0.5 s", timeout, 0.1)
    return float(value)


def test_a_late_router_replays_what_it_missed_and_matches_the_live_one(
    tmp_path: Path, router: RouterFactory
) -> None:
    """Both routers index the same number of the engine's blocks: the late one's come from the
    replay; new events then reach both."""
    port, pub, replay = free_port(), free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        KVSTACK, "engine", "sim", "--port", str(port), "--served-model-name", MODEL, "--speed", "50",
        "--max-model-len", "4096", "--num-gpu-blocks", "2000",
        *kv_events_flags(pub, replay),
    ]  # fmt: skip
    engines = tmp_path / "engines.yaml"
    entry = sim_engine_entry("engine-0", http=port, kv_events=pub, kv_replay=replay, models=[MODEL])
    engines.write_text(yaml.safe_dump([entry]))
    settings = {"engines_file": engines, "policy": "cache_aware", "monitor": FAST_MONITOR}

    def complete(base: str, i: int) -> None:
        prompt = f"Document {i}: " + "every block the engine stores is an event. " * 30
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=30).status_code == 200

    with running([ManagedProcess("sim-events", argv, tmp_path, ready_url=f"{url}/health")]):
        live = router(available=1, **settings)
        for i in range(6):
            complete(live.url, i)
        before = _settle(lambda: _index(live))
        assert before > 0, "no events indexed: the test would prove nothing"

        late = router(available=1, **settings)
        assert _settle(lambda: _index(late)) == before
        assert late.metric("kvstack_router_kv_event_replays_total") >= 1

        for i in range(6, 9):
            complete(url, i)  # straight to the engine: both routers only hear the events
        after = _settle(lambda: _index(live))
        assert after > before
        assert _settle(lambda: _index(late)) == after
        assert live.metric("kvstack_router_kv_event_batches_lost_total") == 0
        assert late.metric("kvstack_router_kv_event_batches_lost_total") == 0
