"""Admission: which engines may take a request, flow control's queue, and the scale-from-zero hold.

The proxy asks here before it routes: flow control (:mod:`kvstack.router.flow`) sends a request on
at once, queues it while every engine of the model is saturated, or refuses it with a 429. A
request for a model at zero replicas (one the router holds: :mod:`kvstack.router.hold`) waits
(bounded, with a deadline) for an engine to appear: in the model's flow queue, with its class and
its tenant's share, when flow control covers it, else in the hold. Either way it is counted in
``kvstack_router_queued_requests``. Refusals are counted by reason in
``kvstack_router_rejections_total``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from kvstack.common.errors import OpenAIError
from kvstack.router.context import RouterContext
from kvstack.router.engines import EngineState
from kvstack.router.exchange import RetryLater
from kvstack.router.flow.config import PriorityClass
from kvstack.router.flow.grant import Grant
from kvstack.router.hold import HoldFull, HoldTimeout, hold_full_error, hold_timeout_error
from kvstack.router.policies.base import ExpectedHit

HELD_RETRY_S = 0.5  # a held request's pause between tries of an engine that is not listening yet


def reject(ctx: RouterContext, reason: str, err: OpenAIError) -> OpenAIError:
    """``err``, counted as a rejection for ``reason``."""
    ctx.metrics.rejections.labels(reason).inc()
    return err


class Admission:
    """The admission steps of one router, shared by every proxied route."""

    def __init__(self, ctx: RouterContext) -> None:
        self.ctx = ctx

    def available(self, model: str | None, tried: Collection[str] = ()) -> list[EngineState]:
        """The engines a request for ``model`` may go to now (:func:`routable`), ``tried`` left out."""
        registry, now = self.ctx.registry, self.ctx.clock()
        if model is None:  # /tokenize without a model: any available engine
            return [e for e in registry.all() if e.available(now) and e.url not in tried]
        return registry.candidates(model, now, tried)

    def candidates(self, model: str | None) -> list[EngineState]:
        """Available engines for ``model``, else the error :func:`no_engine` decides."""
        found = self.available(model)
        if found:
            return found
        raise no_engine(model, self.ctx.registry.all())

    async def hold(self, model: str) -> float | None:
        """Wait while ``model`` has no engine and the router holds it; returns the hold's deadline.

        None when the request was not held. Counted as queued while it waits.
        """
        ctx = self.ctx
        if not ctx.holds.holds(model) or self.available(model):
            return None
        timeout = ctx.settings.hold_timeout_s
        deadline = ctx.clock() + timeout
        gauge = ctx.metrics.queued.labels(model)
        gauge.inc()
        try:
            while not self.available(model):  # woken, but the engine may be gone again
                await ctx.holds.wait(model, deadline - ctx.clock())
        except HoldFull:
            raise reject(ctx, "hold_full", hold_full_error(model)) from None
        except HoldTimeout:
            raise reject(ctx, "hold_timeout", hold_timeout_error(model, timeout)) from None
        finally:
            gauge.dec()
        return deadline

    async def wait_held(self, model: str, until: float) -> None:
        """A pause before a held request tries its woken engine again, still counted as queued."""
        gauge = self.ctx.metrics.queued.labels(model)
        gauge.inc()
        try:
            await asyncio.sleep(min(HELD_RETRY_S, max(0.0, until - self.ctx.clock())))
        finally:
            gauge.dec()

    async def queued(
        self,
        model: str | None,
        demand: Demand | None,
        route: Callable[[list[EngineState]], Awaitable[None]],
    ) -> None:
        """Run ``route`` once flow control gives the request its turn (:mod:`kvstack.router.flow`).

        ``route`` gets the engines with room at that moment (late binding: the policy decides then,
        with the index as it is then). Without flow control (``demand`` None: it is off, or the
        request names no model) that is at once. 404 or 503 (from :meth:`candidates`) when no
        engine can serve; 429 with Retry-After when flow control refuses the request. A request for
        a held model with no engine waits in the queue too (``demand.held_until``: the hold's
        deadline). While it waits it is counted in ``kvstack_router_queued_requests``.
        """
        ctx = self.ctx
        if model is None or demand is None:
            await route(self.candidates(model))
            return
        candidates = self.available(model)
        if not candidates:
            if not ctx.holds.holds(model):
                raise no_engine(model, ctx.registry.all())
            demand.held_until = ctx.clock() + ctx.settings.hold_timeout_s
            ctx.holds.announce(model)  # the adapter loader loads a held adapter
        gauge = ctx.metrics.queued.labels(model)
        gauge.inc()
        try:
            demand.grant = await ctx.flow.admit(
                model, demand.tenant, demand.cls, demand.cost, candidates, demand.prompt_tokens
            )
        finally:
            gauge.dec()
        try:
            # engines may have come or gone while it waited: look again
            await route(
                ctx.flow.with_room(self.candidates(model), demand.grant, demand.hits, demand.prompt_tokens)
            )
        finally:
            ctx.flow.release(demand.grant)


@dataclass(slots=True)
class Demand:
    """What flow control needs to know about a request, and the turn it was given."""

    tenant: str
    cls: PriorityClass
    cost: float  # prompt tokens less the best engine's expected cached prefix (before routing)
    grant: Grant | None = None
    prompt_tokens: float = 0.0
    hits: Callable[[EngineState], ExpectedHit] | None = None  # an engine's cached prefix of the prompt
    held_until: float | None = None  # queued while its model had no engine: the hold's deadline


def no_engine(model: str | None, engines: list[EngineState]) -> OpenAIError:
    """Why no engine can take a request for ``model`` now, given every known engine.

    - 404 when no known engine serves ``model`` and each has told its models (with no engine at
      all, e.g. an empty engines file, nothing serves it: 404 too, as before).
    - 503 + Retry-After while it may change soon: some engine's models not learnt yet (a router
      just started asks each engine's ``/v1/models``), or every engine serving the model is down
      (an ejected one still serves: :func:`~kvstack.router.engines.routable`).
    """
    if model is not None and not any(model in e.models for e in engines):
        if all(e.models for e in engines):
            return OpenAIError(404, f"The model `{model}` does not exist.", param="model")
        return RetryLater(503, "the router is still learning which models its engines serve; try again", 1.0)
    return RetryLater(503, f"no engine is available for model {model!r}; try again shortly", 1.0)
