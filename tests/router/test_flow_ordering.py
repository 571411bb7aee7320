"""Flow control's queue order and fair shares, table by table: FCFS, earliest deadline and
cheapest-first with aging; weighted, work-conserving shares between tenants."""

from __future__ import annotations

import math

import pytest

from kvstack.router.flow.fairness import FairShare, below_share, fair_work_ahead, over_share
from kvstack.router.flow.ordering import Waiting, next_waiting, order_key, start_deadline

RATE = 34_000.0  # an H200 prefills ~34K tokens/s cold (the router's default)


# ---------------------------------------------------------------- ordering


def w(
    seq: int,
    arrival: float,
    *,
    priority: int = 0,
    tenant: str = "t",
    cost: float = 100,
    deadline: float = math.inf,
) -> Waiting:
    return Waiting(seq, arrival, priority, tenant, cost, deadline)


def first_tenant(tenants: set[str]) -> str:
    return min(tenants)


@pytest.mark.parametrize(
    ("ordering", "items", "expected"),
    [
        ("fcfs", [w(2, 2.0), w(1, 1.0), w(3, 3.0)], 1),
        ("fcfs", [w(1, 1.0), w(2, 2.0, priority=5)], 2),  # the class before anything else
        ("edf", [w(1, 1.0, deadline=9.0), w(2, 2.0, deadline=3.0)], 2),
        ("edf", [w(1, 1.0), w(2, 2.0, deadline=50.0)], 2),  # no objective: after every deadline
        ("edf", [w(1, 1.0), w(2, 2.0)], 1),  # no deadlines: arrival order
        ("cheapest", [w(1, 1.0, cost=5000), w(2, 1.05, cost=100)], 2),
        # aging: waited 1 s, worth RATE tokens, so the long prompt goes before a newer short one
        ("cheapest", [w(1, 0.0, cost=20_000), w(2, 1.0, cost=100)], 1),
        ("cheapest", [w(1, 0.0, cost=100), w(2, 0.0, cost=100)], 1),  # a tie: the lower sequence
        ("cheapest", [w(1, 0.0, cost=9e9), w(2, 1.0, cost=1, priority=1)], 2),
    ],
)
def test_next_waiting(ordering: str, items: list[Waiting], expected: int) -> None:
    chosen = next_waiting(items, ordering, RATE, first_tenant)  # type: ignore[arg-type]
    assert chosen is not None and chosen.seq == expected


@pytest.mark.parametrize(
    ("arrival", "objective", "cost", "rate", "expected"),
    [
        (10.0, 1.0, 0.0, 8_500.0, 11.0),  # nothing to prefill: the objective's own deadline
        (10.0, 1.0, 4_250.0, 8_500.0, 10.5),  # half a second of its own prefill: start by 10.5
        (10.0, 1.0, 17_000.0, 8_500.0, 9.0),  # longer than the objective: overdue on arrival
        (10.0, 1.0, 4_250.0, 0.0, 11.0),  # no rate known: the objective's deadline
        (10.0, None, 4_250.0, 8_500.0, math.inf),  # no objective: never due
    ],
)
def test_start_deadline(
    arrival: float, objective: float | None, cost: float, rate: float, expected: float
) -> None:
    assert start_deadline(arrival, objective, cost, rate) == expected


def test_edf_starts_a_long_prompt_before_an_earlier_short_one_of_its_class() -> None:
    """Inside one class every deadline is arrival + the same objective: ordered by that alone, EDF
    would be FCFS. The start deadline puts a prompt that needs 0.5 s of prefill before a short one
    that came 0.2 s earlier."""
    short = w(1, 0.0, cost=100, deadline=start_deadline(0.0, 1.0, 100, 8_500.0))
    long = w(2, 0.2, cost=4_250, deadline=start_deadline(0.2, 1.0, 4_250, 8_500.0))
    assert next_waiting([short, long], "edf", RATE, first_tenant) is long
    assert next_waiting([short, long], "fcfs", RATE, first_tenant) is short


def test_nobody_waiting_and_tenants_picked_only_among_the_top_class() -> None:
    assert next_waiting([], "fcfs", RATE, first_tenant) is None
    asked: list[set[str]] = []

    def pick(tenants: set[str]) -> str:
        asked.append(tenants)
        return "b"

    items = [w(1, 1.0, tenant="a"), w(2, 2.0, tenant="b"), w(3, 0.5, tenant="c", priority=-1)]
    chosen = next_waiting(items, "fcfs", RATE, pick)
    assert chosen is not None and chosen.seq == 2
    assert asked == [{"a", "b"}]


def test_cheapest_keys_never_change_while_waiting() -> None:
    a, b = w(1, 0.0, cost=20_000), w(2, 0.4, cost=100)
    assert order_key(b, "cheapest", RATE) < order_key(a, "cheapest", RATE)  # b jumps a: it is cheap
    c = w(3, 0.6, cost=100)  # 0.6 s later a has aged past c's cost
    assert order_key(a, "cheapest", RATE) < order_key(c, "cheapest", RATE)


@pytest.mark.parametrize(
    ("tenant", "cost", "queued", "weights", "ahead"),
    [
        ("a", 100, {}, {}, 0),  # nobody waits
        ("a", 100, {"a": 500}, {}, 500),  # its own queue is all ahead
        ("b", 100, {"a": 5000}, {}, 100),  # A is served as much as B's newcomer: 100 of A's 5,000
        ("a", 100, {"a": 5000, "b": 300}, {}, 5300),  # A's newcomer is behind all of it
        ("b", 100, {"a": 5000, "b": 300}, {}, 300 + 400),
        ("b", 100, {"a": 5000}, {"a": 3.0}, 300),  # A's weight 3: thrice B's work goes first
        ("b", 100, {"a": 5000}, {"b": 2.0}, 50),
        ("b", 100, {"a": 50}, {}, 50),  # A holds less than B's turn: all of it
    ],
)
def test_fair_work_ahead(
    tenant: str, cost: float, queued: dict[str, float], weights: dict[str, float], ahead: float
) -> None:
    assert fair_work_ahead(tenant, cost, queued, weights, 0.0) == pytest.approx(ahead)


# ---------------------------------------------------------------- fair shares


def serve(fair: FairShare, backlog: dict[str, int], cost: float, rounds: int) -> dict[str, int]:
    """Serve ``rounds`` requests of ``cost`` tokens from tenants always waiting; counts per tenant."""
    for tenant in backlog:
        fair.waiting(tenant)
    served = dict.fromkeys(backlog, 0)
    for _ in range(rounds):
        tenant = fair.pick(set(backlog))
        fair.charge(tenant, cost)
        served[tenant] += 1
    return served


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({}, {"a": 50, "b": 50}),
        ({"a": 3.0}, {"a": 75, "b": 25}),
        ({"a": 1.0, "b": 4.0}, {"a": 20, "b": 80}),
    ],
)
def test_weighted_shares_of_backlogged_tenants(weights: dict[str, float], expected: dict[str, int]) -> None:
    assert serve(FairShare(weights), {"a": 1, "b": 1}, 1000, 100) == expected


def test_cost_counts_tokens_as_well_as_requests() -> None:
    fair = FairShare({}, request_tokens=0)
    for tenant in ("big", "small"):
        fair.waiting(tenant)
    served = {"big": 0, "small": 0}
    for _ in range(110):
        tenant = fair.pick({"big", "small"})
        fair.charge(tenant, 10_000 if tenant == "big" else 1_000)
        served[tenant] += 1
    assert served == {"big": 10, "small": 100}  # equal tokens, not equal requests


def test_an_idle_tenant_banks_no_credit_and_its_state_is_forgotten() -> None:
    fair = FairShare({})
    serve(fair, {"a": 1}, 1000, 50)  # a alone takes everything: work conserving
    fair.waiting("b")  # b arrives late: it starts level with a, not 50 requests ahead
    assert serve(fair, {"a": 1, "b": 1}, 1000, 10) == {"a": 5, "b": 5}
    fair.idle("a")
    fair.idle("b")
    assert fair.vtime == {}


@pytest.mark.parametrize(
    ("tenant", "queued", "weights", "over"),
    [
        ("a", {}, {}, False),  # alone: the whole queue is its share
        ("a", {"a": 1000}, {}, False),
        ("a", {"a": 1000, "b": 2000}, {}, False),
        ("a", {"a": 3000, "b": 1000}, {}, True),
        ("a", {"a": 2000, "b": 1000}, {"a": 3.0}, False),
        ("b", {"a": 3000, "b": 900}, {"a": 3.0}, False),  # exactly its quarter with the newcomer
        ("b", {"a": 3000, "b": 1500}, {"a": 3.0}, True),
    ],
)
def test_over_share(tenant: str, queued: dict[str, float], weights: dict[str, float], over: bool) -> None:
    assert over_share(tenant, 100, queued, weights, 0) is over


@pytest.mark.parametrize(
    ("tenant", "work", "weights", "below"),
    [
        ("a", {}, {}, True),  # nothing held by anyone
        ("a", {"a": 100.0}, {}, False),  # the only holder holds all of it: its whole share
        ("b", {"a": 100.0}, {}, True),  # b holds none of it: under its half
        ("a", {"a": 50.0, "b": 50.0}, {}, False),  # exactly its share is not under it
        ("a", {"a": 40.0, "b": 60.0}, {}, True),
        ("a", {"a": 40.0, "b": 60.0}, {"a": 0.5}, False),  # a third is its share at weight 0.5
        ("a", {"a": 40.0, "b": 0.0}, {}, False),  # a tenant holding nothing has no share
    ],
)
def test_below_share(tenant: str, work: dict[str, float], weights: dict[str, float], below: bool) -> None:
    assert below_share(tenant, work, weights) is below
