"""Late binding at run time: where a request given its turn goes when the engine holding its
prefix is saturated (the pure rule: router/flow/placement.py), over a real engine registry."""

from __future__ import annotations

import pytest

from kvstack.router.policies.base import ExpectedHit

from .flow_harness import M, cls, make, start


@pytest.mark.parametrize(
    ("held", "load_s", "engines"),
    [
        (30_000, 0.0, ["http://e0"]),
        (1_000, 0.0, ["http://e1"]),
        # e1 would load what e0 holds from the shared store, 0.3 s beyond computing it: 1.18 s there
        (1_000, 0.3, ["http://e0"]),
    ],
)
async def test_a_request_goes_to_its_briefly_saturated_hit_engine_when_that_is_sooner(
    held: float, load_s: float, engines: list[str]
) -> None:
    control, registry, metrics = make(n_engines=2, max_in_flight=None)
    e0, e1 = registry.all()
    busy = await control.admit(M, "t", cls(control), 9_000, registry.all())
    await start(control, e0, busy)  # 9,000 tokens of backlog: over its 8,500 (0.25 s at 34K/s)
    assert control.with_room(registry.all()) == [e1]
    grant = await control.admit(M, "t", cls(control), 0, registry.all())
    # e0 holds ``held`` of a 30,000-token prompt: 0.26 s behind its backlog against 0.88 s cold on e1
    chosen = control.with_room(
        registry.all(),
        grant,
        lambda e: ExpectedHit(held, 0.0) if e is e0 else ExpectedHit(0.0, load_s),
        30_000,
    )
    assert [e.url for e in chosen] == engines
    waits = metrics.registry.get_sample_value("kvstack_router_flow_hit_waits_total", {"model_name": M})
    assert (waits or 0.0) == (1.0 if engines == ["http://e0"] else 0.0)


@pytest.mark.parametrize(
    ("service_s", "engines"),
    [
        (None, ["http://e1"]),  # no request has finished: no slot wait to weigh, cold on e1
        (0.1, ["http://e0"]),  # a slot there in 0.1 s, then 1,000 tokens: sooner than 0.88 s cold
        (10.0, ["http://e1"]),  # a slot only in 10 s: the cold prefill on e1 is sooner
    ],
)
async def test_a_request_waits_for_a_slot_at_its_full_hit_engine_when_that_is_sooner(
    service_s: float | None, engines: list[str]
) -> None:
    control, registry, _ = make(n_engines=2, max_in_flight=None)
    e0, e1 = registry.all()
    busy = await control.admit(M, "t", cls(control), 100, registry.all())
    await start(control, e0, busy)
    control.room.ledger(e0).slots = 1.0  # its learnt batch: one request, and it runs one
    assert control.with_room(registry.all()) == [e1]
    if service_s is not None:
        control.room.service_s[M] = service_s
    grant = await control.admit(M, "t", cls(control), 0, registry.all())
    chosen = control.with_room(
        registry.all(), grant, lambda e: ExpectedHit(29_000 if e is e0 else 0.0), 30_000
    )
    assert [e.url for e in chosen] == engines


@pytest.mark.parametrize(
    ("waiting", "kv_usage", "engines"),
    [
        # KV to spare: the request waiting there waits for a step's token budget, so the backlog
        # (100 tokens) is the wait: sooner than 0.88 s cold, no slot wait needed
        (1.0, 0.2, ["http://e0"]),
        # KV nearly full (or not scraped): a slot is the wait, unknown before a request finished
        (1.0, 0.92, ["http://e1"]),
        (1.0, None, ["http://e1"]),
        (0.0, 0.96, ["http://e1"]),  # its KV full (it would preempt): never
    ],
)
async def test_requests_waiting_in_an_engine_with_kv_to_spare_wait_for_its_backlog_not_a_slot(
    waiting: float, kv_usage: float | None, engines: list[str]
) -> None:
    control, registry, _ = make(n_engines=2, max_in_flight=None)
    e0, e1 = registry.all()
    busy = await control.admit(M, "t", cls(control), 100, registry.all())
    await start(control, e0, busy)
    e0.num_waiting, e0.kv_cache_usage, e0.last_scrape = waiting, kv_usage, 1.0
    assert control.with_room(registry.all()) == [e1]
    grant = await control.admit(M, "t", cls(control), 0, registry.all())
    chosen = control.with_room(
        registry.all(), grant, lambda e: ExpectedHit(29_000 if e is e0 else 0.0), 30_000
    )
    assert [e.url for e in chosen] == engines


@pytest.mark.parametrize(
    ("n_engines", "backlog", "engines"),
    [
        # the measured case (bench-results/lmcache, r10-flow): its hit engine behind 2,480 tokens,
        # the other (the last with room) holding only the system prompt. The cold first token is a
        # little sooner (2,340 tokens against 2,596) but the requests after it would wait behind
        # 2,224 more tokens of prefill there: wait
        (2, 2480.0, ["http://e0"]),
        # behind 6,000 tokens the cold engine costs less, even with its prefill counted twice
        (2, 6000.0, ["http://e1"]),
        # two engines with room: the next request has one even after a cold prefill, so the first
        # token decides: cold
        (3, 2480.0, ["http://e1", "http://e2"]),
    ],
)
async def test_a_warm_turn_waits_at_its_overdue_hit_engine_when_going_cold_costs_more(
    n_engines: int, backlog: float, engines: list[str]
) -> None:
    now = [0.0]
    control, registry, _ = make(n_engines=n_engines, clock=lambda: now[0], max_in_flight=None)
    e0 = registry.all()[0]
    busy = await control.admit(M, "t", cls(control), backlog, registry.all())
    e0.in_flight += 1
    control.dispatched(busy, e0, backlog, streamed=True)
    e0.num_waiting, e0.kv_cache_usage, e0.last_scrape = 0.0, 0.3, 1.0
    now[0] = 5.0  # its first token is past due: the engine is queueing (``overdue``)
    assert control.with_room(registry.all()) == registry.all()[1:]
    grant = await control.admit(M, "t", cls(control), 116, registry.all())
    chosen = control.with_room(
        registry.all(), grant, lambda e: ExpectedHit(3216.0 if e is e0 else 992.0), 3332.0
    )
    assert [e.url for e in chosen] == engines


async def test_behind_a_backlog_the_router_accounts_the_first_token_decides_even_on_the_last_engine() -> None:
    # e0 saturated by the 9,000 tokens the router sent it (``prefill_backlog``, nothing overdue):
    # 9,000 + 1,000 there against 8,000 cold on e1, the last engine with room. The backlog is the
    # router's exact account, so the first token decides: cold (counting e1's prefill twice, 11,000
    # against 16,000, would have waited)
    now = [0.0]
    control, registry, _ = make(n_engines=2, clock=lambda: now[0], max_in_flight=None)
    e0, e1 = registry.all()
    busy = await control.admit(M, "t", cls(control), 9000, registry.all())
    e0.in_flight += 1
    control.dispatched(busy, e0, 9000, streamed=True)
    grant = await control.admit(M, "t", cls(control), 1000, registry.all())
    chosen = control.with_room(
        registry.all(), grant, lambda e: ExpectedHit(29_000.0 if e is e0 else 22_000.0), 30_000.0
    )
    assert chosen == [e1]
