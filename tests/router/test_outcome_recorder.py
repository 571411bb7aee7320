"""What a finished try does to its engine: the upstream-error counter, the outlier track, ejections."""

from __future__ import annotations

import logging

import pytest

from kvstack.router.app import build_context
from kvstack.router.config import load_settings
from kvstack.router.context import RouterContext
from kvstack.router.engines import Endpoint, EngineState
from kvstack.router.outcome_recorder import OutcomeRecorder, outlier_rules
from kvstack.router.retry import AttemptFailure, FailureKind

A, B = "http://10.0.0.1:8000", "http://10.0.0.2:8000"


def context(now: float = 100.0) -> tuple[RouterContext, EngineState, EngineState]:
    ctx = build_context(load_settings(eject_after_failures=2, max_ejected_percent=50.0))
    ctx.clock = lambda: now
    ctx.registry.sync([Endpoint(A, "a", frozenset({"m"})), Endpoint(B, "b", frozenset({"m"}))])
    a, b = ctx.registry.get(A), ctx.registry.get(B)
    assert a is not None and b is not None
    return ctx, a, b


def sample(ctx: RouterContext, name: str, **labels: str) -> float:
    return ctx.metrics.registry.get_sample_value(name, labels) or 0.0


def fail(kind: FailureKind, status: int = 502) -> AttemptFailure:
    return AttemptFailure(kind, status, "failed")


@pytest.mark.parametrize(
    ("failure", "label", "ejected"),
    [
        (fail("timeout", 504), "timeout", True),
        (fail("connect"), "connect", True),
        (fail("status", 503), "status_503", True),  # an engine's own 5xx: its status is the kind
        (fail("engine_lost", 504), "engine_lost", True),
        # the request's fault, not the engine's health: counted, never ejects
        (fail("too_large"), "too_large", False),
        (fail("model_gone", 404), "model_gone", False),
    ],
)
def test_failures_are_counted_by_kind_and_only_health_failures_eject(
    failure: AttemptFailure, label: str, ejected: bool
) -> None:
    ctx, a, _ = context()
    recorder = OutcomeRecorder(ctx)
    for _ in range(2):  # eject_after_failures
        recorder.record(a, failure)
    assert sample(ctx, "kvstack_router_upstream_errors_total", engine="a", kind=label) == 2
    assert sample(ctx, "kvstack_router_engine_ejections_total", engine="a") == (1 if ejected else 0)
    assert (a.ejected_until > ctx.clock()) == ejected


def test_a_success_clears_the_failure_streak() -> None:
    ctx, a, _ = context()
    recorder = OutcomeRecorder(ctx)
    recorder.record(a, fail("timeout", 504))
    recorder.record(a, None)
    recorder.record(a, fail("timeout", 504))
    assert sample(ctx, "kvstack_router_engine_ejections_total", engine="a") == 0
    assert a.outlier.consecutive == 1


def test_no_ejection_past_the_cap_and_it_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    ctx, a, b = context()
    recorder = OutcomeRecorder(ctx)
    for _ in range(2):
        recorder.record(a, fail("connect"))
    with caplog.at_level(logging.WARNING, logger="kvstack.router.outcome_recorder"):
        for _ in range(2):  # half of two engines are ejected already: b stays in
            recorder.record(b, fail("connect"))
    assert sample(ctx, "kvstack_router_engine_ejections_total", engine="b") == 0
    assert b.ejected_until <= ctx.clock()
    assert "too many engines are ejected already" in caplog.text


def test_the_rules_come_from_the_eject_settings() -> None:
    rules = outlier_rules(
        load_settings(
            eject_after_failures=4,
            eject_failure_rate=0.25,
            eject_min_requests=8,
            eject_interval_s=5.0,
            eject_duration_s=10.0,
            eject_max_duration_s=60.0,
            max_ejected_percent=20.0,
        )
    )
    assert (rules.consecutive_failures, rules.failure_rate, rules.min_requests) == (4, 0.25, 8)
    assert (rules.interval_s, rules.base_ejection_s, rules.max_ejection_s) == (5.0, 10.0, 60.0)
    assert rules.max_ejected_percent == 20.0
