"""Flow control's run-time part on the event loop, with a real engine registry and metrics: turns in
order, bounds, timeouts, cancellation, displacement, fair shares and late binding on new engines."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from kvstack.router.engines import Endpoint, EngineState
from kvstack.router.exchange import RetryLater
from kvstack.router.flow.config import PriorityClass
from kvstack.router.flow.grant import Grant

from .flow_harness import M, cls, end, make, queued, settle, start


async def test_turns_in_arrival_order_bounded_and_timed_out() -> None:
    control, registry, metrics = make(models=[{"max_queue": 2}], timeout=0.2)
    engine = registry.all()[0]
    first = await control.admit(M, "t", cls(control), 100, registry.all())
    assert first.position == 0 and first.reserved
    await start(control, engine, first)
    order: list[int] = []

    async def wait(seq: int) -> Grant:
        grant = await control.admit(M, "t", cls(control), 100, registry.all())
        order.append(seq)
        return grant

    a = asyncio.create_task(wait(1))
    await settle()
    b = asyncio.create_task(wait(2))
    await settle()
    assert len(control.queues[M]) == 2 and queued(metrics) == 2
    with pytest.raises(RetryLater) as full:
        await control.admit(M, "t", cls(control), 100, registry.all())
    assert full.value.status == 429 and "queued" in full.value.message
    await end(control, engine, first)
    ga = await a
    assert order == [1] and ga.position == 1
    await start(control, engine, ga)
    await end(control, engine, ga)
    gb = await b
    assert order == [1, 2]
    await start(control, engine, gb)
    with pytest.raises(RetryLater) as late:  # nobody frees the engine: the wait times out
        await control.admit(M, "t", cls(control), 100, registry.all())
    assert "timed out" in late.value.message
    assert queued(metrics) == 0 and not control.queues[M]


async def test_a_cancelled_waiter_leaves_at_once_and_a_turn_it_was_given_passes_on() -> None:
    control, registry, metrics = make()
    engine = registry.all()[0]
    first = await control.admit(M, "t", cls(control), 100, registry.all())
    await start(control, engine, first)
    task = asyncio.create_task(control.admit(M, "t", cls(control), 100, registry.all()))
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not control.queues[M] and queued(metrics) == 0
    # given its turn and cancelled before it could use it: the next in line gets the turn
    doomed = asyncio.create_task(control.admit(M, "t", cls(control), 100, registry.all()))
    await settle()
    heir = asyncio.create_task(control.admit(M, "t", cls(control), 100, registry.all()))
    await settle()
    await end(control, engine, first)  # pump: doomed's future is set, it has not run yet
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    grant = await asyncio.wait_for(heir, 2)
    assert grant.reserved and control.reserved[M] == 1


CLASSES = [
    {"name": "interactive", "priority": 10, "ttft_objective_s": 30.0},
    {"name": "batch", "priority": 0},
]


async def test_a_higher_class_goes_first_and_displaces_the_newest_lower_one_from_a_full_queue() -> None:
    control, registry, metrics = make(classes=CLASSES, default_class="batch", models=[{"max_queue": 2}])
    engine = registry.all()[0]
    running = await control.admit(M, "t", cls(control, "batch"), 100, registry.all())
    await start(control, engine, running)
    batch = [
        asyncio.create_task(control.admit(M, "t", cls(control, "batch"), 100, registry.all()))
        for _ in range(2)
    ]
    await settle()
    urgent = asyncio.create_task(control.admit(M, "t", cls(control, "interactive"), 100, registry.all()))
    await settle()
    with pytest.raises(RetryLater) as shed:
        await batch[1]  # the newest batch request made way
    assert shed.value.status == 429 and "made way" in shed.value.message
    assert (
        metrics.registry.get_sample_value(
            "kvstack_router_flow_shed_total", {"reason": "displaced", "class": "batch"}
        )
        == 1
    )
    await end(control, engine, running)
    grant = await urgent
    assert grant.class_name == "interactive" and grant.position == 1 and not batch[0].done()
    await start(control, engine, grant)
    await end(control, engine, grant)
    assert (await batch[0]).class_name == "batch"  # the batch class still progresses


async def test_fair_shares_between_tenants_when_one_floods() -> None:
    control, registry, _ = make(tenants=[{"name": "a"}, {"name": "b"}])
    engine = registry.all()[0]
    running = await control.admit(M, "a", cls(control), 100, registry.all())
    await start(control, engine, running)
    served: list[str] = []

    async def ask(tenant: str) -> None:
        grant = await control.admit(M, tenant, cls(control), 100, registry.all())
        served.append(tenant)
        await start(control, engine, grant)
        await asyncio.sleep(0)
        await end(control, engine, grant)

    tasks = [asyncio.create_task(ask("a")) for _ in range(8)]
    await settle()
    tasks += [asyncio.create_task(ask("b")) for _ in range(2)]
    await settle()
    await end(control, engine, running)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    # b arrived behind eight of a's, and is served alternately with a, not after all of them
    assert served.index("b") <= 1 and served[:4].count("b") == 2


async def test_an_engine_added_takes_the_waiting_requests_at_once() -> None:
    control, registry, _ = make()
    engine = registry.all()[0]
    running = await control.admit(M, "t", cls(control), 100, registry.all())
    await start(control, engine, running)
    waiting = asyncio.create_task(control.admit(M, "t", cls(control), 100, registry.all()))
    await settle()
    assert not waiting.done()
    registry.sync([engine.endpoint, Endpoint("http://e9", "e9", frozenset({M}))])
    control.pump_all()  # the router's context calls this on every registry change
    grant = await asyncio.wait_for(waiting, 2)
    assert [e.name for e in control.with_room(registry.candidates(M, time.monotonic()))] == ["e9"]
    assert grant.position == 1


async def test_held_requests_wait_in_the_queue_by_class_until_an_engine_of_the_model_is_ready() -> None:
    control, registry, metrics = make(
        n_engines=0, max_in_flight=None, classes=[{"name": "default"}, {"name": "top", "priority": 9}]
    )
    control.max_held, control.hold_timeout_s = 3, 5.0
    order: list[str] = []

    async def held(name: str, klass: str = "default") -> Grant:
        grant = await control.admit(M, name, cls(control, klass), 100, [])  # no engine: held
        order.append(name)
        return grant

    waiters = [asyncio.create_task(held("first")), asyncio.create_task(held("second"))]
    await settle()
    waiters.append(asyncio.create_task(held("top", "top")))
    await settle()
    with pytest.raises(RetryLater) as full:  # the hold's bound, not the queue's (1024)
        await control.admit(M, "t", cls(control, "top"), 100, [])
    assert (full.value.status, full.value.message) == (429, f"too many requests waiting for {M} to start")
    assert len(control.queues[M]) == 3 and not any(w.done() for w in waiters)
    registry.sync([Endpoint("http://e0", "e0", frozenset({M}))])
    control.pump_all()  # the registry change: an idle engine takes one at once, the higher class
    await settle()
    assert order == ["top"]
    grant = waiters[2].result()
    assert (grant.position, grant.class_name) == (1, "top")
    engine = registry.all()[0]
    for waiter in waiters[:2]:  # each one's turn comes as the one before it is sent on
        await start(control, engine, grant)
        await end(control, engine, grant)
        grant = await asyncio.wait_for(waiter, 2)
    assert order == ["top", "first", "second"]
    assert [w.result().position for w in waiters[:2]] == [1, 2]
    assert metrics.registry.get_sample_value("kvstack_router_rejections_total", {"reason": "hold_full"}) == 1


async def test_a_held_request_times_out_with_the_hold_s_503_and_fails_with_its_adapter_s_error() -> None:
    control, _, _ = make(n_engines=0)
    control.max_held, control.hold_timeout_s = 5, 0.05
    with pytest.raises(RetryLater) as late:
        await control.admit(M, "t", cls(control), 100, [])
    assert late.value.status == 503 and late.value.retry_after >= 1
    control.hold_timeout_s = 5.0
    waiter = asyncio.create_task(control.admit(M, "t", cls(control), 100, []))
    await settle()
    assert control.fail(M, RetryLater(502, "cannot load", 1.0)) == 1
    with pytest.raises(RetryLater) as failed:
        await waiter
    assert failed.value.status == 502 and len(control.queues[M]) == 0 and control.reserved.get(M, 0) == 0


def test_unknown_class_is_a_400_naming_the_header() -> None:
    control, _, _ = make(
        classes=CLASSES, default_class="batch", tenants=[{"name": "vip", "default_class": "interactive"}]
    )
    assert control.classify(None, None, "anonymous")[1].name == "batch"
    assert control.classify("vip", None, "k")[1].name == "interactive"  # the tenant's default
    assert control.classify(None, "interactive", "k") == ("k", cls(control, "interactive"))
    with pytest.raises(Exception, match="x-kvstack-priority") as err:
        control.classify(None, "gold", "k")
    assert getattr(err.value, "status", None) == 400


async def test_a_full_queue_sheds_the_tenant_over_its_share_and_makes_way_for_one_under_it() -> None:
    control, registry, metrics = make(models=[{"max_queue": 2}], tenants=[{"name": "a"}, {"name": "b"}])
    engine = registry.all()[0]
    running = await control.admit(M, "a", cls(control), 100, registry.all())
    await start(control, engine, running)
    flood = [asyncio.create_task(control.admit(M, "a", cls(control), 100, registry.all())) for _ in range(2)]
    await settle()
    newcomer = asyncio.create_task(control.admit(M, "b", cls(control), 100, registry.all()))
    await settle()
    with pytest.raises(RetryLater) as made_way:  # a held the whole queue: its newest makes way for b
        await flood[1]
    assert "made way" in made_way.value.message
    with pytest.raises(RetryLater) as over:  # a again, holding its half already: refused
        await control.admit(M, "a", cls(control), 100, registry.all())
    assert over.value.status == 429 and "share" in over.value.message
    shed = {"reason": "over_share", "class": "default"}
    assert metrics.registry.get_sample_value("kvstack_router_flow_shed_total", shed) == 1
    assert queued(metrics, tenant="a") == 1 and queued(metrics, tenant="b") == 1
    await end(control, engine, running)
    first = await flood[0]
    await start(control, engine, first)
    await end(control, engine, first)
    assert (await newcomer).tenant == "b"


async def test_the_engines_waiting_queue_counts_when_our_streams_confirm_it() -> None:
    now = [100.0]
    control, registry, _ = make(clock=lambda: now[0])
    control.room.limits = dataclasses.replace(control.room.limits, max_in_flight=None)
    engine = registry.all()[0]
    first = await control.admit(M, "t", cls(control), 3400, registry.all())
    engine.in_flight += 1
    control.dispatched(first, engine, 3400, streamed=True)  # 0.1 s of prefill: due 0.35 s later
    engine.num_waiting = 1  # a scrape caught a request between two steps
    assert control.room_for(M, [engine], now[0], 0) == 1  # our stream is on time: not queueing
    now[0] += 0.36  # still no first token: the engine is queueing ours
    assert control.room_for(M, [engine], now[0], 0) == 0
    control.first_token(first, 0.37)
    assert control.room_for(M, [engine], now[0], 0) == 0  # no stream of ours to tell by: the scrape decides


async def test_requests_ended_since_the_last_scrape_free_the_engines_waiting_queue_at_once() -> None:
    control, registry, _ = make()
    control.room.limits = dataclasses.replace(control.room.limits, max_in_flight=None)
    engine = registry.all()[0]
    engine.num_waiting, engine.last_scrape = 0.0, 1.0
    grants = []
    for _ in range(2):
        grant = await control.admit(M, "t", cls(control), 100, registry.all())
        await start(control, engine, grant)
        grants.append(grant)
    assert control.room_for(M, [engine], time.monotonic(), 0) == 1  # the scrape saw no queue
    engine.num_waiting, engine.last_scrape = 1.0, 2.0  # the next scrape: one of them waits there
    assert control.room_for(M, [engine], time.monotonic(), 0) == 0
    await end(control, engine, grants[0])  # it ended: the waiting one runs in its place
    assert control.room_for(M, [engine], time.monotonic(), 0) == 1
    engine.num_waiting, engine.last_scrape = 2.0, 3.0  # a fresh scrape counts afresh
    assert control.room_for(M, [engine], time.monotonic(), 0) == 0


@pytest.mark.parametrize(
    ("interactive_seen_at", "third_batch_waits"),
    [
        (None, False),  # no higher class: batch may fill the whole engine (work-conserving)
        (0.0, True),  # interactive seen a second ago: batch fills only its share, the rest is headroom
        (-30.0, False),  # seen longer ago than the window: the headroom is given back
    ],
)
async def test_a_lower_class_leaves_headroom_for_a_higher_class_seen_lately(
    interactive_seen_at: float | None, third_batch_waits: bool
) -> None:
    now = [0.0]
    classes = [
        {"name": "interactive", "priority": 10, "ttft_objective_s": 1.0},
        {"name": "batch", "priority": 0},
    ]
    # 8,500 tokens of prefill target at 34K tokens/s; batch's share of it while interactive is about: 4,250
    control, registry, _ = make(
        clock=lambda: now[0], max_in_flight=None, classes=classes, default_class="batch"
    )
    engine = registry.all()[0]
    if interactive_seen_at is not None:
        now[0] = interactive_seen_at
        seen = await control.admit(M, "t", cls(control, "interactive"), 10, registry.all())
        await start(control, engine, seen)
        await end(control, engine, seen)
    now[0] = 1.0
    for _ in range(2):  # 3,000 then 6,000 tokens of backlog
        grant = await control.admit(M, "t", cls(control, "batch"), 3000, registry.all())
        assert grant.position == 0
        await start(control, engine, grant)
    third = asyncio.create_task(control.admit(M, "t", cls(control, "batch"), 3000, registry.all()))
    await settle()
    assert (not third.done()) == third_batch_waits
    if third_batch_waits:
        # the headroom is the interactive class's: it goes at once, past the waiting batch request
        urgent = await control.admit(M, "t", cls(control, "interactive"), 1000, registry.all())
        assert urgent.position == 0 and control.with_room(registry.all(), urgent) == [engine]
        third.cancel()
        with pytest.raises(asyncio.CancelledError):
            await third
    else:
        assert (await third).position == 0


@pytest.mark.parametrize("interactive_about", [False, True])
async def test_a_lower_class_keeps_off_engines_cleared_for_a_higher_class(interactive_about: bool) -> None:
    """Each batch request is a longer prefill than the target (one per engine), so a share of an
    engine's target bounds nothing: with interactive about, batch holds at most half the engines."""
    classes = [
        {"name": "interactive", "priority": 10, "ttft_objective_s": 1.0},
        {"name": "batch", "priority": 0},
    ]
    control, registry, _ = make(4, max_in_flight=None, classes=classes, default_class="batch")
    engines = registry.all()
    if interactive_about:  # seen, done: its class is within the headroom window
        seen = await control.admit(M, "t", cls(control, "interactive"), 10, engines)
        await start(control, engines[0], seen)
        await end(control, engines[0], seen)
    sent: list[tuple[Grant, EngineState]] = []
    while True:
        batch = asyncio.create_task(control.admit(M, "t", cls(control, "batch"), 20_000, engines))
        await settle()
        if not batch.done():
            break
        grant = batch.result()
        engine = control.with_room(engines, grant)[0]
        await start(control, engine, grant)
        sent.append((grant, engine))
    used = {e.url for _, e in sent}
    assert len(used) == len(sent) == (2 if interactive_about else 4)
    if interactive_about:
        # the other two are idle and kept clear: an interactive request goes there at once
        urgent = await control.admit(M, "t", cls(control, "interactive"), 20_000, engines)
        assert urgent.position == 0
        assert {e.url for e in control.with_room(engines, urgent)} == {e.url for e in engines} - used
        control.release(urgent)
    # batch progresses: one of its requests ends, the waiting one gets a turn, and any engine but
    # the one it still holds (busy with its prefill) may take it: it holds one engine of its two
    done, engine = sent[0]
    await end(control, engine, done)
    waited = await batch
    assert waited.position == 1
    busy = {e.url for _, e in sent[1:]}
    assert {e.url for e in control.with_room(engines, waited)} == {e.url for e in engines} - busy
    control.release(waited)


async def test_a_queued_requests_first_token_teaches_the_models_prediction_correction() -> None:
    control, registry, _ = make()
    engine = registry.all()[0]
    first = await control.admit(M, "t", cls(control), 3400, registry.all())
    await start(control, engine, first)
    control.first_token(first, 5.0)  # it did not wait: its prediction decided nothing
    assert M not in control.forecast.correction
    waiter = asyncio.create_task(control.admit(M, "t", cls(control), 3400, registry.all()))
    await settle()
    await end(control, engine, first)
    second = await waiter
    assert second.position == 1 and second.predicted_ttft_s is not None
    await start(control, engine, second)
    control.first_token(second, 4 * second.predicted_ttft_s)  # far later than predicted
    assert control.forecast.correction[M] > 1.0  # the next prediction is scaled up (by the EWMA's weight)


@pytest.mark.parametrize(("bound_s", "refused"), [(1.0, True), (10.0, False)])
async def test_a_request_predicted_to_outwait_the_queue_timeout_is_refused_at_once(
    bound_s: float, refused: bool
) -> None:
    """No objective (the default class): the queue's own bound is the promise. 102,000 tokens in
    flight at the default 34,000 tokens/s: ~3.1 s to a first token, past a 1 s bound, within 10 s."""
    control, registry, metrics = make(timeout=bound_s)
    engine = registry.all()[0]
    busy = await control.admit(M, "t", cls(control), 102_000, registry.all())
    await start(control, engine, busy)
    waiter = asyncio.create_task(control.admit(M, "t", cls(control), 3400, registry.all()))
    await settle()
    shed = metrics.registry.get_sample_value(
        "kvstack_router_flow_shed_total", {"reason": "wait_bound", "class": "default"}
    )
    if refused:  # at once, not after the bound ran out: 429 with a Retry-After from the backlog
        assert waiter.done()
        with pytest.raises(RetryLater) as err:
            waiter.result()
        assert (
            err.value.status == 429 and err.value.retry_after == 3.0
        )  # the backlog: 102,000 / 34,000 tokens/s
        assert "predicted to exceed" in err.value.message and shed == 1.0 and queued(metrics) == 0
    else:
        assert not waiter.done() and shed == 0.0 and queued(metrics) == 1
        await end(control, engine, busy)
        assert (await waiter).position == 1


async def test_a_prompt_too_long_for_its_objective_waits_alone_and_is_refused_behind_others() -> None:
    """A 2 s objective; the engine prefills 34,000 tokens/s and is busy with 34,000 tokens (a 1 s
    wait). 102,000 tokens take 3 s even on an idle engine: with nobody waiting, refusing it helps no
    one, so it waits and is served; a second such prompt behind it is refused (it would take the
    capacity the first waits for), and so is a short one that misses by the wait alone."""
    objective = PriorityClass(name="default", ttft_objective_s=2.0)
    control, registry, metrics = make(classes=[objective])
    engine = registry.all()[0]
    busy = await control.admit(M, "t", cls(control), 34_000, registry.all())
    await start(control, engine, busy)
    long = asyncio.create_task(control.admit(M, "t", cls(control), 102_000, registry.all()))
    await settle()
    assert not long.done() and queued(metrics) == 1

    def shed(reason: str) -> float | None:
        labels = {"reason": reason, "class": "default"}
        return metrics.registry.get_sample_value("kvstack_router_flow_shed_total", labels)

    with pytest.raises(RetryLater) as second:
        await control.admit(M, "t", cls(control), 102_000, registry.all())
    assert second.value.status == 429 and "own prefill" in second.value.message
    with pytest.raises(RetryLater) as short:
        await control.admit(M, "t", cls(control), 3_400, registry.all())
    assert short.value.status == 429 and "cannot be met now" in short.value.message
    assert (shed("slo_prefill"), shed("slo")) == (1.0, 1.0)
    rejected = metrics.registry.get_sample_value("kvstack_router_rejections_total", {"reason": "slo"})
    assert rejected == 2.0  # both are missed objectives to the router's rejections counter
    await end(control, engine, busy)
    grant = await long
    assert grant.position == 1 and grant.predicted_ttft_s is not None and grant.predicted_ttft_s > 2.0
    await start(control, engine, grant)
    await end(control, engine, grant)
    assert queued(metrics) == 0


async def test_a_first_token_after_a_wait_for_a_batch_slot_teaches_no_prefill_rate() -> None:
    """An engine whose batch holds one request: the second request sent there waits for the first to
    end, so its first token (10 s for 4,000 tokens) times that wait, not the engine's prefill, and
    the rate stays; the first one's (1 s) moves it by the learning weight."""
    now = [100.0]
    control, registry, _ = make(n_engines=2, clock=lambda: now[0], max_in_flight=None)
    engine = registry.all()[0]
    prior = control.room.rate(engine)
    first = await control.admit(M, "t", cls(control), 4_000, registry.all())
    second = await control.admit(M, "t", cls(control), 4_000, registry.all())
    # its batch learnt to hold one (as a scrape with requests waiting teaches); both are sent
    # there, as placement sends a warm turn to its full hit engine when waiting there is sooner
    control.room.ledger(engine).slots = 1.0
    await start(control, engine, first)
    await start(control, engine, second)
    assert (first.waited_for_slot, second.waited_for_slot) == (False, True)
    now[0] = 110.0
    control.first_token(second, 10.0)
    assert control.room.rate(engine) == prior
    first.dispatched_at = 109.0  # its first token 1 s after it was sent: ~4,000 tokens/s
    control.first_token(first, 1.0)
    assert control.room.rate(engine) == pytest.approx(0.9 * prior + 0.1 * 4_000, rel=0.01)


@pytest.mark.parametrize(("ordering", "first_served"), [("fcfs", "short"), ("edf", "long")])
async def test_edf_serves_first_the_request_that_must_start_first(ordering: str, first_served: str) -> None:
    """One class, one objective: EDF by arrival + objective would be FCFS. A prompt with a second of
    its own prefill must reach the engine a second sooner, and under ``edf`` it does."""
    classes = [PriorityClass(name="default", ttft_objective_s=10.0)]
    control, registry, _ = make(models=[{"ordering": ordering}], classes=classes)
    engine = registry.all()[0]
    busy = await control.admit(M, "t", cls(control), 100, registry.all())
    await start(control, engine, busy)
    served: list[str] = []

    async def wait(name: str, cost: float) -> Grant:
        grant = await control.admit(M, "t", cls(control), cost, registry.all())
        served.append(name)
        return grant

    short = asyncio.create_task(wait("short", 100))
    await settle()
    long = asyncio.create_task(wait("long", 34_000))  # ~1 s of prefill at the default rate
    await settle()
    assert len(control.queues[M]) == 2
    await end(control, engine, busy)
    winner = await (short if first_served == "short" else long)
    assert served == [first_served]
    await start(control, engine, winner)
    await end(control, engine, winner)
    await asyncio.gather(short, long)
    assert served[1] != first_served


@pytest.mark.parametrize(("memory_s", "admission"), [(2.0, "slo_room"), (0.0, "room")])
async def test_while_overloaded_room_refuses_a_request_predicted_late_behind_the_prefill_sent(
    memory_s: float, admission: str
) -> None:
    """A 1 s objective, two engines at 34,000 tokens/s each. One holds 68,000 tokens of prefill (a 1 s
    wait at the pair's rate); a short request on the other fills the last room, so the next one is
    refused: the model is overloaded. When the short one ends, its engine has room again, and a warm
    request (3,400 of its 34,000 prompt tokens to prefill: 0.1 s alone, ~1.1 s behind the prefill
    sent) is refused with room too (``slo_room``), within ``overload_memory_s``; with the memory off
    it is dispatched. A cold one of the same cost (its whole prompt to prefill) is dispatched either
    way, and so is another tenant's warm one (t's work is what it would wait for)."""
    now = [100.0]
    objective = PriorityClass(name="default", ttft_objective_s=1.0)
    control, registry, metrics = make(
        n_engines=2,
        clock=lambda: now[0],
        classes=[objective],
        saturation={"overload_memory_s": memory_s},
    )
    e0, e1 = registry.all()
    busy = await control.admit(M, "t", cls(control), 68_000, registry.all())
    await start(control, e0, busy)
    filler = await control.admit(M, "t", cls(control), 100, registry.all())
    assert filler.admission == "room"
    await start(control, e1, filler)
    with pytest.raises(RetryLater) as refused:  # no room anywhere, late by the wait: rule 2a
        await control.admit(M, "t", cls(control), 3_400, registry.all())
    assert refused.value.status == 429
    await end(control, e1, filler)
    now[0] = 101.0  # within the memory; the prefill sent to e0 is not due yet (68,000 tokens: 2 s)
    cold = await control.admit(M, "t", cls(control), 3_400, registry.all(), prompt_tokens=3_400)
    assert cold.admission == "room"
    control.release(cold)
    if admission == "room":
        grant = await control.admit(M, "t", cls(control), 3_400, registry.all(), prompt_tokens=34_000)
        assert grant.admission == "room" and grant.predicted_ttft_s is not None
        assert grant.predicted_ttft_s > 1.0  # predicted late, dispatched all the same
        control.release(grant)
    else:
        with pytest.raises(RetryLater) as late:
            await control.admit(M, "t", cls(control), 3_400, registry.all(), prompt_tokens=34_000)
        assert late.value.status == 429 and "cannot be met now" in late.value.message
        assert late.value.retry_after == pytest.approx(1.0)  # when the 68,000 tokens sent are done
        # another tenant's warm request is dispatched: the prefill it would wait for is all t's
        other = await control.admit(M, "u", cls(control), 3_400, registry.all(), prompt_tokens=34_000)
        assert other.admission == "room"
        control.release(other)
        # the overload ends 2 s after the last request queued or refused without room (at 100 s): a
        # refusal with room does not extend it, or the retries it asks for would keep it going
        assert control.forecast.capacity(M, registry.all(), 101.9, True).overloaded
        assert not control.forecast.capacity(M, registry.all(), 102.1, True).overloaded
    labels = {"reason": "slo_room", "class": "default"}
    shed = metrics.registry.get_sample_value("kvstack_router_flow_shed_total", labels)
    assert shed == (1.0 if admission == "slo_room" else 0.0)
