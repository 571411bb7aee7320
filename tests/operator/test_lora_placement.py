"""The adapter placement, table by table: pinned, by demand, capacity, hysteresis, restarts."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from kvstack.operator.lora_placement import Declared, EngineChange, EngineState, Placement, place


def engines(*loaded: str, ready: bool = True) -> list[EngineState]:
    """Engines e0, e1, ... each with the comma-separated adapters it lists."""
    return [
        EngineState(f"e{i}", ready, frozenset(a for a in spec.split(",") if a))
        for i, spec in enumerate(loaded)
    ]


def hosts(p: Placement) -> dict[str, tuple[str, ...]]:
    return {a.name: a.engines for a in p.adapters}


def reasons(p: Placement) -> dict[str, str]:
    return {a.name: a.reason for a in p.adapters}


def after(start: list[EngineState], p: Placement) -> list[EngineState]:
    """The engines once the changes are done."""
    changes = {c.engine: c for c in p.changes}
    out = []
    for e in start:
        c = changes.get(e.name, EngineChange(e.name, (), ()))
        out.append(EngineState(e.name, e.ready, (e.loaded - set(c.unload)) | set(c.load)))
    return out


A, B, C, D = (Declared(n) for n in "abcd")


@pytest.mark.parametrize(
    ("declared", "state", "slots", "demand", "where", "why"),
    [
        # no ready engine: nothing anywhere
        ([A], engines("", ready=False), 2, {"a": 1.0}, {"a": ()}, {"a": "no_engines"}),
        # pinned goes everywhere, the other by demand
        (
            [Declared("p", pinned=True), A],
            engines("", "", ""),
            2,
            {"a": 1.0},
            {"p": ("e0", "e1", "e2"), "a": ("e0", "e1", "e2")},
            {"p": "pinned", "a": "demand"},
        ),
        # pinned beyond the slots: the first ones fit
        (
            [Declared("p", pinned=True), Declared("q", pinned=True)],
            engines("", ""),
            1,
            {},
            {"p": ("e0", "e1"), "q": ()},
            {"p": "pinned", "q": "no_capacity"},
        ),
        # capacity for all: every declared adapter somewhere, the busy one on more engines
        (
            [A, B, C],
            engines("", "", ""),
            2,
            {"a": 10.0, "b": 1.0},
            {"a": ("e0", "e1", "e2"), "b": ("e0", "e1"), "c": ("e2",)},
            {"a": "demand", "b": "demand", "c": "spare_capacity"},
        ),
        # too little capacity: the idle adapter gets nothing, the busy ones one each at least
        (
            [A, B, C, D],
            engines("", ""),
            1,
            {"a": 5.0, "b": 1.0},
            {"a": ("e0",), "b": ("e1",), "c": (), "d": ()},
            {"a": "demand", "b": "demand", "c": "idle", "d": "idle"},
        ),
        # more adapters with demand than slots: the busiest win
        (
            [A, B, C],
            engines("", ""),
            1,
            {"a": 1.0, "b": 3.0, "c": 2.0},
            {"a": (), "b": ("e0",), "c": ("e1",)},
            {"a": "no_capacity", "b": "demand", "c": "demand"},
        ),
        # rates unknown: every adapter keeps where it is, and free slots still get the others
        (
            [A, B, C],
            engines("a", "b", ""),
            1,
            None,
            {"a": ("e0",), "b": ("e1",), "c": ("e2",)},
            {"a": "held", "b": "held", "c": "spare_capacity"},
        ),
    ],
)
def test_placement_table(
    declared: list[Declared],
    state: list[EngineState],
    slots: int,
    demand: Mapping[str, float] | None,
    where: dict[str, tuple[str, ...]],
    why: dict[str, str],
) -> None:
    p = place(declared, state, slots, demand)
    assert hosts(p) == where
    assert reasons(p) == why
    for e in after(state, p):
        assert len(e.loaded) <= slots


def test_changes_unload_first_and_undeclared_adapters_go() -> None:
    state = engines("a,old", "")
    p = place([A], state, 2, {"a": 1.0})
    assert p.changes == (EngineChange("e0", unload=("old",), load=()), EngineChange("e1", (), ("a",)))


def test_a_stable_placement_has_no_changes() -> None:
    state = engines("", "", "")
    p = place([A, B, C], state, 2, {"a": 10.0, "b": 1.0})
    assert place([A, B, C], after(state, p), 2, {"a": 10.0, "b": 1.0}).changes == ()


@pytest.mark.parametrize(
    ("new_rates", "moves"),
    [
        ({"a": 10.0, "b": 10.0}, False),  # the same
        ({"a": 9.0, "b": 11.0}, False),  # b 22% busier than a per engine: within the margin
        ({"a": 6.0, "b": 14.0}, True),  # far apart: b takes an engine from a
    ],
)
def test_hysteresis_keeps_placements_when_demand_barely_moves(
    new_rates: dict[str, float], moves: bool
) -> None:
    state = engines("", "", "")
    p = place([A, B], state, 1, {"a": 10.0, "b": 10.0})
    settled = after(state, p)
    before = {a.name: len(a.engines) for a in p.adapters}
    assert sorted(before.values()) == [1, 2]
    q = place([A, B], settled, 1, new_rates)
    assert (q.changes != ()) == moves
    if moves:
        assert {a.name: len(a.engines) for a in q.adapters} == {"a": 1, "b": 2}


def test_a_restarted_engine_gets_its_adapters_back() -> None:
    declared = [Declared("p", pinned=True), A]
    state = engines("p,a", "p,a")
    assert place(declared, state, 2, {"a": 1.0}).changes == ()
    restarted = [state[0], EngineState("e1", True, frozenset())]
    p = place(declared, restarted, 2, {"a": 1.0})
    assert p.changes == (EngineChange("e1", (), ("a", "p")),)


def test_an_unready_engine_is_left_alone() -> None:
    state = [EngineState("e0", True, frozenset()), EngineState("e1", False, frozenset({"x"}))]
    p = place([A], state, 1, {"a": 1.0})
    assert p.changes == (EngineChange("e0", (), ("a",)),)


def test_a_newcomer_never_displaces_a_loaded_adapter_with_equal_claim() -> None:
    state = engines("a", "b")
    p = place([A, B, C], state, 1, {"a": 1.0, "b": 1.0, "c": 1.0})
    assert hosts(p) == {"a": ("e0",), "b": ("e1",), "c": ()}
    assert p.changes == ()
    assert reasons(p)["c"] == "no_capacity"


def test_zero_slots_is_refused() -> None:
    with pytest.raises(ValueError, match="slots"):
        place([A], engines(""), 0, {})


@pytest.mark.parametrize(("rate_b", "holder"), [(1.1, "a"), (1.5, "b")])
def test_the_only_slot_changes_hands_only_beyond_the_margin(rate_b: float, holder: str) -> None:
    p = place([A, B], engines("a"), 1, {"a": 1.0, "b": rate_b})
    assert hosts(p) == {"a": ("e0",) if holder == "a" else (), "b": ("e0",) if holder == "b" else ()}
