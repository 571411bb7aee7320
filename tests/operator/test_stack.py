"""One KVStack's handling without kopf: the tick's plan, the Events, and the apply/tick outcomes.

The happy paths against the real API server run through kopf in ``test_reconcile_cluster.py`` and
``test_autoscale_cluster.py``; here the decisions, and the refusals that need no cluster: an invalid
spec and an API server that cannot be reached (a closed local port).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kvstack.common.kube import Credentials, KubeClient, StaticToken
from kvstack.common.procs import free_port
from kvstack.operator.autoscale import Decision
from kvstack.operator.conditions import Condition
from kvstack.operator.controller import Evaluation, ModelOutcome
from kvstack.operator.kube import Kube
from kvstack.operator.metrics import OperatorMetrics
from kvstack.operator.ownership import Owner
from kvstack.operator.runtime import Runtime
from kvstack.operator.settings import OperatorSettings
from kvstack.operator.stack import (
    Notice,
    StackMemory,
    StatusChange,
    TickPlan,
    apply,
    body_is_current,
    evaluation_due,
    forget,
    notices,
    plan_tick,
    status_fields,
    tick,
)

OWNER = Owner(name="demo", namespace="ns", uid="u-1")
SPEC: dict[str, Any] = {"models": [{"name": "llama", "model": "m"}]}
# The CRD schema accepts this; the engine loader refuses it (kvstack renders --max-model-len itself).
ENGINE_REFUSES: dict[str, Any] = {
    "models": [{"name": "llama", "model": "m", "args": ["--max-model-len", "9"]}]
}
log = logging.getLogger(__name__)
READY = {"type": "Ready", "status": "True", "reason": "AllReady"}


def memory(**fields: Any) -> StackMemory:
    """A stack this process has set ``Ready=True`` on, with ``fields`` as given."""
    return StackMemory(conditions={"Ready": Condition(True, "AllReady", "1/1")}, **fields)


@pytest.mark.parametrize(
    ("mem", "existing", "now", "want"),
    [
        (memory(), [READY], 10.0, TickPlan(resend=False, resync=False)),  # not applied by this process
        (memory(next_resync=10.0), [READY], 10.0, TickPlan(resend=False, resync=True)),
        (memory(next_resync=10.5), [READY], 10.0, TickPlan(resend=False, resync=False)),
        (memory(next_resync=1.0, invalid=True), [READY], 10.0, TickPlan(resend=False, resync=False)),
        (memory(next_resync=99.0), [], 10.0, TickPlan(resend=True, resync=False)),
        (memory(invalid=True), [{**READY, "status": "False"}], 10.0, TickPlan(resend=True, resync=False)),
    ],
)
def test_plan_tick(mem: StackMemory, existing: list[dict[str, Any]], now: float, want: TickPlan) -> None:
    assert plan_tick(mem, existing, now) == want


@pytest.mark.parametrize(
    ("mem", "now", "due"),
    [
        (memory(), 0.0, True),  # a stack this process has not evaluated yet
        (memory(next_evaluation=15.0), 14.9, False),
        (memory(next_evaluation=15.0), 15.0, True),
        (memory(next_evaluation=0.0, invalid=True), 15.0, False),
    ],
)
def test_evaluation_due(mem: StackMemory, now: float, due: bool) -> None:
    assert evaluation_due(mem, now) is due


@pytest.mark.parametrize(
    ("generation", "applied", "current"),
    [(3, 3, True), (4, 3, True), (2, 3, False), (None, None, True), (1, None, True), (None, 2, False)],
)
def test_a_timer_never_reapplies_an_older_body(
    generation: int | None, applied: int | None, current: bool
) -> None:
    assert body_is_current(generation, applied) is current


def outcome(name: str, current: int, decision: Decision | None) -> ModelOutcome:
    entry = {"name": name, "currentReplicas": current, "readyReplicas": current, "desiredReplicas": current}
    return ModelOutcome(entry, decision)


UP = Decision(3, "up", "queue", "waiting 9", ())
DOWN = Decision(1, "down", "idle", "waiting 0", ())
HELD = Decision(2, "none", "cooldown", "held", ())
UNREACHABLE: dict[str, Any] = {"prometheus_ok": False, "prometheus_error": "connection refused"}


@pytest.mark.parametrize(
    ("seen", "before", "want"),
    [
        (
            Evaluation(
                [outcome("a", 1, UP), outcome("b", 2, DOWN), outcome("c", 2, HELD), outcome("d", 1, None)]
            ),
            None,
            (
                Notice(False, "ScaledUp", "a: 1 -> 3 (queue): waiting 9"),
                Notice(False, "ScaledDown", "b: 2 -> 1 (idle): waiting 0"),
            ),
        ),
        (Evaluation([], **UNREACHABLE), None, (Notice(True, "PrometheusUnreachable", "connection refused"),)),
        (
            Evaluation([], **UNREACHABLE),
            Condition(True, "QuerySucceeded"),
            (Notice(True, "PrometheusUnreachable", "connection refused"),),
        ),
        (
            Evaluation([], **UNREACHABLE),
            Condition(False, "QueryFailed", "connection refused"),
            (),
        ),  # told once
        (Evaluation([], prometheus_ok=True), Condition(False, "QueryFailed", "x"), ()),
    ],
)
def test_notices(seen: Evaluation, before: Condition | None, want: tuple[Notice, ...]) -> None:
    assert notices(seen, before) == want


def test_status_fields_carry_the_router_only_when_there_is_one() -> None:
    seen = Evaluation([outcome("a", 2, None)])
    assert status_fields(seen) == {"models": [seen.models[0].entry], "engines": "2/2"}
    seen.router = {"replicas": 1, "readyReplicas": 0, "selector": "a=b"}
    assert status_fields(seen)["router"] == seen.router


@pytest.fixture
async def unreachable_kube() -> AsyncIterator[Kube]:
    """An API server address nothing listens on: every request is refused."""
    kube = Kube(KubeClient(Credentials(f"http://127.0.0.1:{free_port()}", StaticToken(None))))
    yield kube
    await kube.aclose()


async def test_an_invalid_spec_is_reported_and_remembered(unreachable_kube: Kube) -> None:
    mem = StackMemory()
    applied = await apply(
        unreachable_kube, OWNER, ENGINE_REFUSES, 4, mem, now=100.0, resync_seconds=60, logger=log
    )
    assert applied.failed is None and mem.invalid and mem.applied_generation is None
    change = applied.change
    assert change.conditions["Reconciled"] == change.conditions["Ready"]
    reconciled = change.conditions["Reconciled"]
    assert (reconciled.status, reconciled.reason, reconciled.generation) == (False, "InvalidSpec", 4)
    assert "max-model-len" in reconciled.message
    assert change.fields == {"observedGeneration": 4}
    assert [(n.warning, n.reason) for n in change.notices] == [(True, "InvalidSpec")]
    assert not evaluation_due(mem, 1000.0)


async def test_an_unreachable_api_server_asks_for_a_retry(unreachable_kube: Kube) -> None:
    mem = StackMemory()
    applied = await apply(unreachable_kube, OWNER, SPEC, 2, mem, now=100.0, resync_seconds=60, logger=log)
    assert applied.failed is not None
    reconciled = applied.change.conditions["Reconciled"]
    assert (reconciled.status, reconciled.reason) == (False, "ApplyFailed")
    assert str(applied.failed) in reconciled.message
    assert applied.change.fields == {}  # observedGeneration stays at the last applied spec
    assert (mem.invalid, mem.applied_generation, mem.next_resync) == (False, None, None)


def runtime_with(kube: Kube | None) -> Runtime:
    runtime = Runtime(OperatorSettings(metrics_port=0, liveness_port=0, resync_seconds=30))
    runtime.kube = kube
    return runtime


async def test_a_tick_survives_an_unreachable_api_server(unreachable_kube: Kube) -> None:
    mem = memory(next_resync=50.0, next_evaluation=0.0)
    status = {"conditions": [READY]}
    change = await tick(runtime_with(unreachable_kube), OWNER, SPEC, 1, status, mem, now=100.0, logger=log)
    assert change is None  # nothing lost, the evaluation failed: nothing to write
    # Both were attempted, and wait for their next turn.
    assert (mem.next_resync, mem.next_evaluation) == (130.0, 115.0)


async def test_a_tick_resends_lost_conditions_even_while_stopping() -> None:
    mem = memory(next_resync=0.0)
    change = await tick(runtime_with(None), OWNER, SPEC, 1, {"conditions": []}, mem, now=100.0, logger=log)
    assert change == StatusChange()
    assert mem.next_resync == 0.0  # no client: nothing attempted


async def test_a_tick_of_an_unparsable_spec_writes_nothing() -> None:
    mem = memory()
    bad = {"models": [{"name": "Not A Label", "model": "m"}]}
    assert await tick(runtime_with(None), OWNER, bad, 1, {}, mem, now=100.0, logger=log) is None


def test_forget_drops_a_deleted_stacks_series() -> None:
    metrics = OperatorMetrics()
    metrics.record("ns", "m", Decision(1, "none", "steady", "", ()), 1, 1, None, 1.0)
    labels = {"namespace": "ns", "model_name": "m"}
    assert metrics.registry.get_sample_value("kvstack_operator_desired_replicas", labels) == 1.0
    forget(metrics, "ns", {"models": [{"name": "llama", "model": "m"}]})
    assert metrics.registry.get_sample_value("kvstack_operator_desired_replicas", labels) is None
    forget(metrics, "ns", {"models": "not a list"})  # an unparsable spec: nothing to forget, no error


async def test_a_tick_ends_quietly_when_cleanup_closed_the_client_under_it() -> None:
    # The race at a stop: cleanup closes the shared client while a tick is between two requests.
    kube = Kube(KubeClient(Credentials(f"http://127.0.0.1:{free_port()}", StaticToken(None))))
    await kube.aclose()
    runtime = runtime_with(kube)
    with pytest.raises(RuntimeError, match="closed"):  # not stopping: a real failure, kopf retries
        await tick(runtime, OWNER, SPEC, 1, {"conditions": [READY]}, memory(), now=100.0, logger=log)
    runtime.closing = True
    mem = memory(next_resync=50.0)
    assert await tick(runtime, OWNER, SPEC, 1, {"conditions": [READY]}, mem, now=100.0, logger=log) is None
    assert (mem.next_resync, mem.next_evaluation) == (130.0, 0.0)  # the resync had started
