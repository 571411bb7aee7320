"""The flow benchmark's client on the real router and a simulator: it retries a refused request as
the openai SDK does, after the router's Retry-After, and records what its user saw.

The refusals come from the router's per-key rate limit (one request a second, a burst of one,
``Retry-After`` 1 s): three users sending at the same moment get one admission, and each retry
finds the token the wait was for, so the outcome per ``retries`` is exact.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from kvstack.bench import flow, flow_plan
from kvstack.bench.driver import wait_for_engines
from kvstack.bench.flow_driver import Client, run_trace
from kvstack.bench.flow_plan import Policy, Stream
from kvstack.bench.flow_stack import FlowSetup, ready_stack, stack
from kvstack.bench.sglang_router import sglang_workers_healthy
from kvstack.bench.workloads import Session, Turn
from kvstack.common.procs import running


def trace(retries: int) -> list[tuple[Stream, Session]]:
    """Three one-turn users arriving together, 1 s into the trace (the bucket has refilled by then:
    the previous trace's last admission came before its end)."""
    stream = Stream("A", 1.0, 1.0)
    return [
        (stream, Session(f"r{retries}-u{i}", f"system prompt {i}", [Turn(f"question {i}", 4)], start=1.0))
        for i in range(3)
    ]


@pytest.mark.slow
def test_refused_requests_are_retried_after_the_retry_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVSTACK_ROUTER_RATE_LIMIT_RPS", "1")
    monkeypatch.setenv("KVSTACK_ROUTER_RATE_LIMIT_BURST", "1")
    setup = FlowSetup(engines=1, speed=1.0, log_dir=tmp_path)
    procs, url = stack(setup, Policy("cache_aware", "cache_aware", flow=False), "client")
    got: dict[int, list[flow_plan.Outcome]] = {}
    with running(procs, timeout=90):
        wait_for_engines(url, 1)
        for retries in (0, 1, 2):
            client = Client(url, setup.model, setup.speed, retries=retries)
            got[retries], _ = asyncio.run(run_trace(client, trace(retries)))

    def attempts(retries: int) -> list[tuple[int, int, int]]:
        return sorted((o.attempts, o.refusals, o.status) for o in got[retries])

    # no retries: the two refused are final refusals, as before retries
    assert attempts(0) == [(1, 0, 200), (1, 1, 429), (1, 1, 429)]
    # one retry: the second admitted on its retry, the third refused twice
    assert attempts(1) == [(1, 0, 200), (2, 1, 200), (2, 2, 429)]
    # two retries (the SDK's default): every request served
    assert attempts(2) == [(1, 0, 200), (2, 1, 200), (3, 2, 200)]
    for o in got[2]:
        assert o.ok and o.cold and o.user is not None and o.ttft_s is not None
        assert o.first_sent_s is not None and o.user_ttft_s is not None
        # the user saw its retry waits (Retry-After: 1 s each) on top of the admitted attempt's TTFT
        waited = o.sent_s - o.first_sent_s
        assert waited >= 1.0 * (o.attempts - 1)
        assert o.user_ttft_s == pytest.approx(waited + o.ttft_s)
    row = flow_plan.summarize(got[1], 1.0)
    assert (row["shed"], row["cold_shed"], row["users"], row["users_never_served"]) == (1, 1, 3, 1)
    assert (row["attempts"], row["refusals"], row["served_after_retry"]) == (5, 3, 1)
    assert row["shed_with_retry_after"] == 1


@pytest.mark.slow
def test_the_sglang_baseline_routes_to_every_simulator_before_a_case_starts(tmp_path: Path) -> None:
    """The peer's stack: the simulators ready first, then the SGLang router, whose ``/health``
    answers before it has registered its workers; the first case starts once all are registered
    (one sent earlier was never routed). Then the ramp runs end to end through it."""
    shape = flow_plan.Shape(rounds=2, system_tokens=40, user_tokens=60, question_tokens=10, answer_tokens=2)
    setup = FlowSetup(
        engines=2, speed=20.0, sim_config=None, capacity_rps=2.0, duration_s=1.0, shape=shape,
        log_dir=tmp_path,
    )  # fmt: skip
    with ready_stack(setup, flow_plan.PEER) as (_procs, url, engines):
        assert len(engines) == 2
        assert sglang_workers_healthy(httpx.get(f"{url}/workers", timeout=5).json(), 2)
    results = flow.run(setup, [flow_plan.PEER], ["ramp"], progress=lambda _line: None)
    assert [r["case"] for r in results.ramp] == ["0.5x", "1x", "1.5x", "2x"]
    for row in results.ramp:
        assert row["completed"] > 0 and row["errors"] == 0 and row["lost"] == 0, row
