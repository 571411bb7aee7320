"""status.adapters entries and the Events of a LoRA round."""

from __future__ import annotations

import pytest

from kvstack.common.lora import LoraError
from kvstack.operator.lora_placement import AdapterPlan, Placement
from kvstack.operator.lora_report import OpResult, Told, adapters_ready, entries, loaded_after, notices

PLACEMENT = Placement(
    (AdapterPlan("sql", ("e0", "e1"), 2, "pinned"), AdapterPlan("chat", ("e1",), 1, "demand")),
    (),
)
FAILED = LoraError("source_not_found", "Loading lora chat failed: No adapter found for /x", status=404)


def test_loaded_after_counts_only_successful_calls() -> None:
    before = {"e0": frozenset({"old"}), "e1": frozenset()}
    results = [
        OpResult("e0", "old", "unload"),
        OpResult("e0", "sql", "load"),
        OpResult("e1", "sql", "load"),
        OpResult("e1", "chat", "load", FAILED),
    ]
    assert loaded_after(before, results) == {"e0": frozenset({"sql"}), "e1": frozenset({"sql"})}


def test_entries_report_desired_loaded_engines_and_the_error() -> None:
    loaded = {"e0": frozenset({"sql"}), "e1": frozenset({"sql"})}
    got = entries("llama", PLACEMENT, loaded, [OpResult("e1", "chat", "load", FAILED)], {})
    assert got == [
        {"name": "sql", "model": "llama", "desired": 2, "loaded": 2, "engines": 2, "reason": "pinned"},
        {
            "name": "chat",
            "model": "llama",
            "desired": 1,
            "loaded": 0,
            "engines": 2,
            "reason": "demand",
            "lastError": "load on e1: Loading lora chat failed: No adapter found for /x",
        },
    ]


def test_last_error_stays_until_the_adapter_is_loaded_where_wanted() -> None:
    previous = {"chat": {"name": "chat", "lastError": "load on e1: boom"}}
    still = entries("llama", PLACEMENT, {"e0": frozenset(), "e1": frozenset()}, [], previous)
    assert still[1]["lastError"] == "load on e1: boom"
    fixed = entries("llama", PLACEMENT, {"e0": frozenset(), "e1": frozenset({"chat"})}, [], previous)
    assert "lastError" not in fixed[1]


def test_notices_group_successes_and_warn_per_failure() -> None:
    results = [
        OpResult("e1", "sql", "load"),
        OpResult("e0", "sql", "load"),
        OpResult("e0", "old", "unload"),
        OpResult("e1", "chat", "load", FAILED),
    ]
    assert notices("llama", results) == [
        Told(False, "AdapterLoaded", "llama: adapter sql loaded on e0, e1"),
        Told(False, "AdapterUnloaded", "llama: adapter old unloaded from e0"),
        Told(
            True,
            "AdapterLoadFailed",
            "llama: load of adapter chat on e1 failed (source_not_found): "
            "Loading lora chat failed: No adapter found for /x",
        ),
    ]
    assert notices("llama", []) == []


def test_a_failure_that_repeats_the_last_error_posts_no_second_event() -> None:
    failed = [OpResult("e1", "chat", "load", FAILED)]
    first = notices("llama", failed)
    previous = {
        e["name"]: e for e in entries("llama", PLACEMENT, {"e0": frozenset(), "e1": frozenset()}, failed, {})
    }
    assert [t.reason for t in first] == ["AdapterLoadFailed"]
    assert notices("llama", failed, previous) == []
    other = LoraError("engine", "LoRA rank 64 is greater than max_lora_rank 16.", status=500)
    assert [t.reason for t in notices("llama", [OpResult("e1", "chat", "load", other)], previous)] == [
        "AdapterLoadFailed"
    ]


@pytest.mark.parametrize(
    ("adapters", "status", "reason", "says"),
    [
        ([], True, "AdaptersLoaded", "0 adapters loaded where wanted"),
        (
            [{"name": "sql", "desired": 2, "loaded": 2}, {"name": "chat", "desired": 0, "loaded": 0}],
            True,
            "AdaptersLoaded",
            "2 adapters loaded where wanted",
        ),
        ([{"name": "sql", "desired": 2, "loaded": 1}], False, "AdaptersLoading", "loaded/wanted: sql 1/2"),
        (
            [
                {"name": "sql", "desired": 2, "loaded": 1},
                {"name": "chat", "desired": 1, "loaded": 0, "lastError": "x"},
            ],
            False,
            "AdapterLoadFailed",
            "chat: x",
        ),
    ],
)
def test_adapters_ready_condition(
    adapters: list[dict[str, object]], status: bool, reason: str, says: str
) -> None:
    cond = adapters_ready(adapters, 3)
    assert (cond.status, cond.reason, cond.message, cond.generation) == (status, reason, says, 3)
