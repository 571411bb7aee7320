"""Polling for a condition, in tests and benchmarks that drive real processes.

One deadline loop for the whole repository: ``wait_until`` from threads and plain functions,
``wait_until_async`` from coroutines (it sleeps on the event loop, so the loop keeps serving).
Both return the predicate's first truthy value and fail naming ``what`` and the last value seen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


def _timed_out(what: str, timeout: float, last: Any) -> AssertionError:
    return AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 60.0, interval: float = 0.25) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise _timed_out(what, timeout, last)


# The same signature as wait_until on purpose, hence a plain timeout argument.
async def wait_until_async(
    predicate: Callable[[], Any],
    what: str,
    timeout: float = 60.0,  # noqa: ASYNC109
    interval: float = 0.05,
) -> Any:
    """``wait_until`` for coroutines: the predicate is called on the loop between sleeps."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        await asyncio.sleep(interval)
    raise _timed_out(what, timeout, last)
