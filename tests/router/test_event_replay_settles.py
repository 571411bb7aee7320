"""The bench's wait for a fresh router's KV-event feed to settle (``wait_for_events_settled``),
against simulators: it returns once the engines' history (replayed) and everything they publish
meanwhile is in the router's index, so a case's CPU and first placements start from the whole
index (bench-results/lmcache section 19: a long history's replay had counted as per-request CPU)."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx

from kvstack.bench import promtext
from kvstack.bench.driver import APPLIED, wait_for_engines, wait_for_events_settled

from .conftest import MODEL, RouterFactory, Sim, run_event_sims

BS = 16


def _chat(sim: Sim, i: int) -> None:
    doc = f"Document {i} of the history the engines hold. " * 40  # ~25 blocks
    body = {"model": MODEL, "messages": [{"role": "user", "content": doc}], "max_tokens": 2}
    assert httpx.post(f"{sim.url}/v1/chat/completions", json=body, timeout=30).status_code == 200


def test_the_wait_returns_once_history_and_live_events_are_applied(
    tmp_path: Path, router: RouterFactory
) -> None:
    with run_event_sims(tmp_path, block_size=BS) as (sims, engines_file):
        for i, sim in enumerate(sims * 3):  # history published before any router listens
            _chat(sim, i)
        r = router(engines_file=engines_file, policy="cache_aware", available=2)
        wait_for_engines(r.url, 2)
        done = threading.Event()

        def traffic() -> None:  # events still arriving while the wait starts
            for i in range(6, 46):
                _chat(sims[i % 2], i)
            done.set()

        feeder = threading.Thread(target=traffic)
        feeder.start()
        try:
            applied = wait_for_events_settled(r.url, quiet_polls=6)  # 1.5 s quiet: margin on a slow CI
            finished_first = done.is_set()
        finally:
            feeder.join()
        after = promtext.scrape(f"{r.url}/metrics")
    assert finished_first  # not while batches were still arriving
    assert promtext.total(after, APPLIED) == applied  # nothing applied after it returned
    assert applied >= 46  # at least a stored batch per request: the history came too
    assert promtext.total(after, "kvstack_router_kv_event_replays_total") >= 2  # by replay, per engine
