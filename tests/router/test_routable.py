"""Which engines a request may go to (router/engines.py ``routable``): one table, every rule."""

from __future__ import annotations

import pytest

from kvstack.router.ejection import OutlierTrack
from kvstack.router.engines import Endpoint, EngineRegistry, EngineState, routable

NOW = 100.0


def engine(
    name: str, *, ejected: bool = False, healthy: bool = True, models: str = "m", lora: str = ""
) -> EngineState:
    """``ejected``: until after NOW; an ejection that ended is ``ejected_until`` at NOW. ``lora``:
    adapters of base model ``m`` it holds (comma-separated)."""
    until = NOW + 30 if ejected else NOW
    adapters = {a: "m" for a in lora.split(",") if a}
    return EngineState(
        endpoint=Endpoint(url=f"http://{name}", name=name),
        models=frozenset(models.split(",")) | adapters.keys(),
        adapters=adapters,
        healthy=healthy,
        outlier=OutlierTrack(ejections=1, ejected_until=until),
    )


@pytest.mark.parametrize(
    ("engines", "tried", "expected"),
    [
        # 1. the available ones, in the registry's order, the tried ones left out
        ([engine("a"), engine("b"), engine("c")], [], ["a", "b", "c"]),
        ([engine("a"), engine("b"), engine("c")], ["http://b"], ["a", "c"]),
        ([engine("a"), engine("b", models="other")], [], ["a"]),
        ([engine("a", models="m,lora")], [], ["a"]),
        # an ejected engine is left out while another is available ...
        ([engine("a", ejected=True), engine("b")], [], ["b"]),
        # ... and an ejection that has ended is no ejection
        ([engine("a"), engine("b")], [], ["a", "b"]),
        # 2. none available: the healthy ones only ejected (a retry after the one left failed too)
        ([engine("a", ejected=True), engine("b", ejected=True)], [], ["a", "b"]),
        ([engine("a", ejected=True), engine("b")], ["http://b"], ["a"]),
        ([engine("a", ejected=True), engine("b", ejected=True)], ["http://a"], ["b"]),
        # 3. an unhealthy engine never, ejected or not
        ([engine("a", ejected=True, healthy=False), engine("b", healthy=False)], [], []),
        ([engine("a", ejected=True), engine("b", healthy=False)], [], ["a"]),
        # every engine tried: nothing left
        ([engine("a", ejected=True), engine("b")], ["http://a", "http://b"], []),
        ([], [], []),
    ],
)
def test_routable(engines: list[EngineState], tried: list[str], expected: list[str]) -> None:
    assert [e.name for e in routable(engines, "m", NOW, tried)] == expected


@pytest.mark.parametrize(
    ("engines", "loadable", "tried", "expected"),
    [
        # an adapter the router can load, its only holder ejected, another engine of its base model
        # available: nothing (the request is held and the adapter loaded there)
        ([engine("a", ejected=True, lora="lo"), engine("b")], ["lo"], [], []),
        # ... not loadable (undeclared, or no loader): its holder, ejected, as any model
        ([engine("a", ejected=True, lora="lo"), engine("b")], [], [], ["a"]),
        # ... no available engine of its base model to load it on: its holder
        ([engine("a", ejected=True, lora="lo"), engine("b", ejected=True)], ["lo"], [], ["a"]),
        ([engine("a", ejected=True, lora="lo"), engine("b", healthy=False)], ["lo"], [], ["a"]),
        ([engine("a", ejected=True, lora="lo"), engine("b", models="other")], ["lo"], [], ["a"]),
        ([engine("a", ejected=True, lora="lo"), engine("b")], ["lo"], ["http://b"], ["a"]),
        # an available holder is taken as always
        ([engine("a", lora="lo"), engine("b")], ["lo"], [], ["a"]),
        ([engine("a", ejected=True, lora="lo"), engine("b", lora="lo")], ["lo"], [], ["b"]),
    ],
)
def test_a_loadable_adapter_is_not_panic_routed(
    engines: list[EngineState], loadable: list[str], tried: list[str], expected: list[str]
) -> None:
    assert [e.name for e in routable(engines, "lo", NOW, tried, loadable)] == expected


def test_the_registry_answers_with_the_same_rule() -> None:
    registry = EngineRegistry()
    registry.sync([Endpoint(url="http://a", name="a", models=frozenset({"m"})),
                   Endpoint(url="http://b", name="b", models=frozenset({"m"}))])  # fmt: skip
    a, b = registry.all()
    a.outlier = OutlierTrack(ejections=1, ejected_until=NOW + 30)
    assert registry.candidates("m", NOW) == [b]
    assert registry.candidates("m", NOW, tried=["http://b"]) == [a]
