"""The retry decision (router/retry.py): every outcome of ``next_step`` from one table."""

from __future__ import annotations

import pytest

from kvstack.router.retry import AttemptFailure, FailureKind, next_step


def failure(kind: FailureKind, status: int = 502, *, sent: bool = False) -> AttemptFailure:
    return AttemptFailure(kind, status, "x", sent=sent)


@pytest.mark.parametrize(
    ("fail", "attempts", "untried_left", "retry", "reason"),
    [
        (failure("connect"), 1, 1, True, "retry"),
        (failure("status", 503), 1, 2, True, "retry"),
        (failure("status", 500), 2, 1, True, "retry"),  # a healthy-looking engine that fails
        (failure("status", 502), 1, 1, True, "retry"),
        (failure("status", 504), 1, 1, True, "retry"),
        (failure("read"), 1, 1, True, "retry"),  # broke off before any byte reached the client
        (failure("engine_lost", 504), 1, 1, True, "retry"),  # declared down before the first byte
        (failure("engine_lost", 504, sent=True), 1, 1, False, "sent"),
        (failure("read", sent=True), 1, 1, False, "sent"),
        (failure("timeout", 504), 1, 1, False, "timeout"),  # alive and maybe still working on it
        (failure("too_large"), 1, 1, False, "too_large"),  # another engine would answer the same
        (failure("status", 501), 1, 1, False, "status"),
        (failure("connect"), 3, 1, False, "attempts"),
        (failure("status", 503), 1, 0, False, "no_engine"),
        (failure("timeout", 504, sent=True), 3, 0, False, "sent"),  # the first rule that stops wins
    ],
)
def test_next_step(fail: AttemptFailure, attempts: int, untried_left: int, retry: bool, reason: str) -> None:
    verdict = next_step(fail, attempts=attempts, max_attempts=3, untried=untried_left)
    assert (verdict.retry, verdict.reason) == (retry, reason)


@pytest.mark.parametrize(
    ("fail", "label"), [(failure("connect"), "connect"), (failure("status", 503), "503")]
)
def test_failure_label(fail: AttemptFailure, label: str) -> None:
    assert fail.label == label


@pytest.mark.parametrize(
    ("attempts", "untried_left", "held", "retry", "reason"),
    [
        (1, 1, False, True, "retry"),  # another engine still serves the model
        (1, 1, True, True, "retry"),  # another engine first, even when the model is held
        (1, 0, True, False, "hold"),  # none left: wait for one (a declared adapter is reloaded)
        (3, 1, True, False, "hold"),  # tries spent: still better to wait than to answer 404
        (1, 0, False, False, "no_engine"),  # not held: the engine's 404 is the answer
        (3, 1, False, False, "attempts"),
    ],
)
def test_next_step_after_an_engine_lost_the_model(
    attempts: int, untried_left: int, held: bool, retry: bool, reason: str
) -> None:
    gone = AttemptFailure("model_gone", 404, "the engine no longer serves lora-a")
    verdict = next_step(gone, attempts=attempts, max_attempts=3, untried=untried_left, held=held)
    assert (verdict.retry, verdict.reason) == (retry, reason)


def test_held_changes_nothing_for_other_failures() -> None:
    verdict = next_step(failure("status", 503), attempts=1, max_attempts=3, untried=0, held=True)
    assert (verdict.retry, verdict.reason) == (False, "no_engine")
