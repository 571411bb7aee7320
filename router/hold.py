"""Scale from zero: requests for a model with no available engine wait here, bounded and timed.

A model that may scale to zero (``hold_models``) has its requests held instead of refused while
it has no available engine; the operator reads the held count (``kvstack_router_queued_requests``)
and starts a replica. The registry's change listener calls :meth:`Holds.wake` the moment an engine
of the model becomes available, so a held request starts without polling delay.

With flow control on, a held request waits in its model's flow queue instead
(:meth:`kvstack.router.flow.controller.FlowControl.admit`, rule 0 of
:mod:`kvstack.router.flow.admission`), which the same registry change pumps; this module then gives
it the bound, the deadline, the errors and the listeners (the adapter loader), and :class:`Holds`
keeps only the waiters of requests outside flow control (it is off, or a route it does not cover).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from kvstack.router.exchange import RetryLater

HOLD_RETRY_AFTER_S = 30.0  # a model still starting after hold_timeout_s: come back in a while


def hold_full_error(model: str) -> RetryLater:
    """429: the model already holds its bound of requests (``max_held_per_model``)."""
    return RetryLater(429, f"too many requests waiting for {model} to start", 1.0)


def hold_timeout_error(model: str, timeout_s: float) -> RetryLater:
    """503: no engine of the model became available within the hold's time."""
    message = f"no engine for {model} became available within {timeout_s:g} s; try again"
    return RetryLater(503, message, HOLD_RETRY_AFTER_S)


class HoldFull(Exception):
    """The model already holds ``max_held`` requests."""


class HoldTimeout(Exception):
    """No engine of the model became available in time."""


class Holds:
    """Per model, the futures of held requests; woken all at once when the model gets an engine."""

    def __init__(self, models: Iterable[str], max_held: int) -> None:
        names = set(models)
        self.any_seen = "*" in names  # every model the router has seen may scale to zero
        self.named = frozenset(names - {"*"})
        self.max_held = max_held
        self.seen: set[str] = set()
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        # told the model of each request that starts waiting (the adapter loader loads a held adapter)
        self.on_wait: list[Callable[[str], None]] = []

    def holds(self, model: str) -> bool:
        """Whether requests for ``model`` wait for an engine instead of failing."""
        return model in self.named or (self.any_seen and model in self.seen)

    def models(self) -> set[str]:
        """Models that can be woken (listed by ``/v1/models`` even with no engine)."""
        return set(self.named) | (self.seen if self.any_seen else set())

    def see(self, models: Iterable[str]) -> list[str]:
        """Remember models some engine served; returns the ones not seen before."""
        new = [m for m in models if m not in self.seen]
        self.seen.update(new)
        return new

    def announce(self, model: str) -> None:
        """A request starts waiting for ``model`` (here or in its flow queue): tell the listeners."""
        for listener in self.on_wait:
            listener(model)

    def held(self, model: str) -> int:
        return len(self._waiters.get(model, ()))

    def waiting_models(self) -> list[str]:
        return [model for model, waiters in self._waiters.items() if waiters]

    async def wait(self, model: str, max_wait: float) -> None:
        """Wait until :meth:`wake` for ``model``; raises HoldFull or HoldTimeout.

        A cancelled waiter (the client went away) leaves the set at once.
        """
        waiters = self._waiters.setdefault(model, set())
        if len(waiters) >= self.max_held:
            raise HoldFull
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.add(fut)
        self.announce(model)
        try:
            async with asyncio.timeout(max_wait):
                await fut
        except TimeoutError:
            raise HoldTimeout from None
        finally:
            waiters.discard(fut)
            if not waiters:
                self._waiters.pop(model, None)

    def fail(self, model: str, error: Exception) -> int:
        """End every request held for ``model`` with ``error`` (e.g. its adapter cannot be loaded)."""
        failed = 0
        for fut in list(self._waiters.get(model, ())):
            if not fut.done():
                fut.set_exception(error)
                failed += 1
        return failed

    def wake(self, model: str) -> int:
        """Release every request held for ``model``; returns how many."""
        woken = 0
        for fut in list(self._waiters.get(model, ())):
            if not fut.done():
                fut.set_result(None)
                woken += 1
        return woken
