"""The router's LoRA decisions (pure): adapters and parents from /v1/models, a request's KV scope,
the engine a held adapter is loaded on, the adapters block of the config, and the events' scope."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kvstack.router.adapters import DeclaredAdapter, kv_scope, pick_engine
from kvstack.router.config import RouterSettings
from kvstack.router.engines import Endpoint, EngineState
from kvstack.router.kvindex.subscriber import served_model
from kvstack.router.monitor import model_cards


def engine(name: str, models: set[str], adapters: dict[str, str] | None = None, **kw: Any) -> EngineState:
    return EngineState(
        endpoint=Endpoint(url=f"http://{name}", name=name),
        models=frozenset(models),
        adapters=adapters or {},
        **kw,
    )


@pytest.mark.parametrize(
    ("body", "ids", "parents"),
    [
        ({"data": [{"id": "m", "root": "/m", "parent": None}]}, {"m"}, {}),
        (
            {"data": [{"id": "m", "parent": None}, {"id": "sql", "root": "/a/sql", "parent": "m"}]},
            {"m", "sql"},
            {"sql": "m"},
        ),
        (
            {"data": [{"id": "m", "parent": "m"}, {"id": "x", "parent": ""}]},
            {"m", "x"},
            {},
        ),  # no self-parents
        ({"data": [{"id": "", "parent": "m"}, "junk", {"id": "a", "parent": "m"}]}, {"a"}, {"a": "m"}),
    ],
)
def test_model_cards_keep_the_parent(body: Any, ids: set[str], parents: dict[str, str]) -> None:
    assert model_cards(body) == (frozenset(ids), parents)


@pytest.mark.parametrize(
    ("model", "engines", "expected"),
    [
        ("m", [engine("a", {"m", "sql"}, {"sql": "m"})], ("m", None)),
        ("sql", [engine("a", {"m", "sql"}, {"sql": "m"})], ("m", "sql")),
        ("sql", [engine("a", {"m"}), engine("b", {"m", "sql"}, {"sql": "m"})], ("m", "sql")),
        ("other", [engine("a", {"m"})], ("other", None)),
    ],
)
def test_kv_scope(model: str, engines: list[EngineState], expected: tuple[str, str | None]) -> None:
    assert kv_scope(model, engines) == expected


@pytest.mark.parametrize(
    ("engines", "exclude", "expected"),
    [
        ([engine("a", {"m"}, own_in_flight=3), engine("b", {"m"}, own_in_flight=1)], (), "b"),  # least loaded
        ([engine("a", {"m"}), engine("b", {"m", "x"}, {"x": "m"})], (), "a"),  # tie: fewer adapters
        ([engine("a", {"m", "sql"}, {"sql": "m"}), engine("b", {"m"}, own_in_flight=9)], (), "b"),  # has it
        ([engine("a", {"m"}, healthy=False), engine("b", {"m"}, own_in_flight=9)], (), "b"),  # unavailable
        ([engine("a", {"other"})], (), None),  # no engine of the base model
        ([engine("a", {"m"}), engine("b", {"m"}, own_in_flight=5)], ("http://a",), "b"),  # a refused
    ],
)
def test_pick_engine(engines: list[EngineState], exclude: tuple[str, ...], expected: str | None) -> None:
    chosen = pick_engine("m", "sql", engines, 0.0, exclude)
    assert (chosen.name if chosen else None) == expected


def test_events_are_scoped_by_the_base_model_not_an_adapter() -> None:
    st = engine("a", {"zz-base", "aa-adapter"}, {"aa-adapter": "zz-base"})
    assert served_model(st) == "zz-base"
    assert served_model(engine("b", set())) is None


@pytest.mark.parametrize(
    ("adapters", "error"),
    [
        (
            [{"name": "a", "model": "m", "source": "org/a"}, {"name": "a", "model": "m", "source": "/b"}],
            "twice",
        ),
        ([{"name": "m", "model": "m", "source": "org/a"}], "also a base model"),
        ([{"name": "a", "model": "m", "source": "not a source"}], "Hub repo id"),
        ([{"name": "bad name", "model": "m", "source": "org/a"}], "adapters.0.name"),
    ],
)
def test_adapters_block_errors_name_the_entry(adapters: list[dict[str, str]], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        RouterSettings.model_validate({"adapters": adapters})


def test_adapters_block_accepts_the_operators_form() -> None:
    s = RouterSettings.model_validate({"adapters": [{"name": "sql", "model": "m", "source": "/models/sql"}]})
    assert s.adapters == [DeclaredAdapter(name="sql", model="m", source="/models/sql")]
