"""Scale from zero: requests for a model with no available engine wait here, bounded and timed.

A model that may scale to zero (``hold_models``) has its requests held instead of refused while
it has no available engine; the operator reads the held count (``kvstack_router_queued_requests``)
and starts a replica. The registry's change listener calls :meth:`Holds.wake` the moment an engine
of the model becomes available, so a held request starts without polling delay.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable


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
        for listener in self.on_wait:
            listener(model)
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
