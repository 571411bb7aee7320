"""An engine that answers 404 for a model the router believed it served (a LoRA adapter unloaded).

vLLM answers ``The model `x` does not exist.`` (404) for a model it does not serve. The router
lists an engine's models from its ``/v1/models``, re-read every 30 s by default, so after an adapter
is unloaded its requests would get that 404 until the next read. Instead, such an answer
(:func:`is_model_gone`) makes the router forget the model on that engine at once and re-read the
engine's models (:func:`forget_model`), and the try counts as failed (``model_gone``): the request
goes to another engine of the model (:func:`kvstack.router.retry.next_step`), or, for a model the
router holds (a declared adapter), it waits until an engine serves it again (the adapter loader
reloads it), raised here as :class:`HoldAgain`; else the engine's 404 is the answer.
"""

from __future__ import annotations

import asyncio
import logging

from kvstack.router.context import RouterContext
from kvstack.router.engines import EngineState
from kvstack.router.retry import AttemptFailure

log = logging.getLogger(__name__)

_refreshes: set[asyncio.Task[bool]] = set()  # running re-reads (a task needs a reference to live)


def _refreshed(task: asyncio.Task[bool]) -> None:
    _refreshes.discard(task)
    if not task.cancelled() and task.exception() is not None:  # e.g. its client closed at shutdown
        log.debug("re-reading an engine's models failed: %s", task.exception())


class HoldAgain(Exception):
    """No engine is left for the request's model, which the router holds: wait for one, then route."""

    def __init__(self, failure: AttemptFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def is_model_gone(status: int, body: bytes, model: str | None) -> bool:
    """Whether an engine's answer says it does not serve ``model`` (vLLM's 404 for a model)."""
    if status != 404 or not model:
        return False
    return f"The model `{model}` does not exist.".encode() in body[:4096]


def forget_model(ctx: RouterContext, engine: EngineState, model: str, answer: bytes) -> AttemptFailure:
    """Stop routing ``model`` to ``engine``, re-read its models, and describe the failed try."""
    if model in engine.models:
        log.info("engine %s no longer serves %s (it answered 404)", engine.name, model)
        engine.models = engine.models - {model}
        engine.adapters.pop(model, None)
        ctx.registry.changed()
    if ctx.refresh_models is not None:
        task = asyncio.ensure_future(ctx.refresh_models(engine))
        _refreshes.add(task)
        task.add_done_callback(_refreshed)
    return AttemptFailure("model_gone", 404, f"the engine no longer serves {model}", answer=answer)
