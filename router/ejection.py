"""Passive ejection: consecutive failed requests take an engine out of rotation for a while.

The proxy counts; the monitor's active health probes may re-admit an engine early by clearing
``ejected_until``. An ejected engine whose time is up gets one request: a failure ejects it again
at once (its count is still at the threshold), a success resets the count.
"""

from __future__ import annotations

from kvstack.router.engines import EngineState


def record_failure(engine: EngineState, now: float, threshold: int, duration: float) -> bool:
    """Count one failure; True when this failure ejected the engine."""
    engine.consecutive_failures += 1
    if engine.consecutive_failures >= threshold and engine.ejected_until <= now:
        engine.ejected_until = now + duration
        return True
    return False


def record_success(engine: EngineState) -> None:
    """A request completed: the failure streak is over."""
    engine.consecutive_failures = 0
