"""The flow benchmark's client on the real router and a simulator: it retries a refused request as
the openai SDK does, after the router's Retry-After, and records what its user saw.

The refusals come from the router's per-key rate limit (one request a second, a burst of one,
``Retry-After`` 1 s): three users sending at the same moment get one admission, and each retry
finds the token the wait was for, so the outcome per ``retries`` is exact.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvstack.bench import flow_plan
from kvstack.bench.driver import wait_for_engines
from kvstack.bench.flow_driver import Client, run_trace
from kvstack.bench.flow_plan import Policy, Stream
from kvstack.bench.flow_stack import FlowSetup, stack
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
