"""Everything a request handler needs, built once per app."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvstack.router.auth import KeyStore
from kvstack.router.config import RouterSettings
from kvstack.router.engines import EngineRegistry, EngineState
from kvstack.router.flow.controller import FlowControl
from kvstack.router.hold import Holds
from kvstack.router.limits import BodyBudget, KeyLimiter
from kvstack.router.local_tokenizer import LocalTokenizerError, LocalTokenizers
from kvstack.router.metrics import RouterMetrics
from kvstack.router.offload import TokenizerPool
from kvstack.router.policies.base import Policy
from kvstack.router.prompts import PromptCache
from kvstack.router.sticky import ResponseOwners, StickyResponsesConfig
from kvstack.router.upstream import Upstream

if TYPE_CHECKING:
    from kvstack.router.tracing import RouterTracing

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "kvstack.request_id"  # where the request-id middleware leaves the id in the ASGI scope
# where the router's own server (router/server.py) leaves the connection's transport in the scope:
# the compiled relay writes a stream's events to its socket (router/relay.py)
TRANSPORT_KEY = "kvstack.transport"


@dataclass
class RouterContext:
    settings: RouterSettings
    registry: EngineRegistry
    policy: Policy
    metrics: RouterMetrics
    keys: KeyStore
    limiter: KeyLimiter
    clock: Callable[[], float] = time.monotonic
    upstream: Upstream | None = None  # opened in the app's lifespan, inside the event loop
    token_cache: PromptCache = field(default_factory=PromptCache)  # prompt tokens for policies that ask
    holds: Holds = field(default_factory=lambda: Holds((), 0))  # scale-from-zero waiters
    offload: TokenizerPool | None = None  # long prompts tokenized off the event loop (app lifespan)
    bodies: BodyBudget = field(default_factory=lambda: BodyBudget(None))  # request bodies held in memory
    tracing: RouterTracing | None = None  # OTLP spans, when settings.tracing.enabled (app lifespan)
    flow: FlowControl = field(init=False)  # flow control: the per-model queues and engine ledgers
    # tokenizer: local: the models' own tokenizers, one set for every route
    local_tokenizers: LocalTokenizers | None = field(init=False)
    # stored /v1/responses: which engine holds each (router/sticky.py)
    owners: ResponseOwners = field(default_factory=lambda: ResponseOwners(StickyResponsesConfig()))
    # re-reads one engine's /v1/models (the monitor's, set in the app lifespan; router/model_gone.py)
    refresh_models: Callable[[EngineState], Awaitable[bool]] | None = None

    def __post_init__(self) -> None:
        settings = self.settings
        self.flow = FlowControl(
            settings.flow_control,
            self.registry,
            self.metrics,
            self.clock,
            max_in_flight=settings.max_in_flight_per_engine,
            queue_timeout_s=settings.queue_timeout_s,
            tick_s=settings.monitor.scrape_interval,
            hold_timeout_s=settings.hold_timeout_s,
            max_held=settings.max_held_per_model,
        )
        if settings.flow_control.enabled:  # one prefill-rate learner: flow control's, per engine
            room = self.flow.room
            if settings.cache_aware.decision.learn_device_speed:
                self.policy.use_prefill_rates(room.pricing_rate, room.device_speeds)
            else:
                self.policy.use_prefill_rates(room.rate)
        path = settings.tokenizer_path
        self.local_tokenizers = (
            LocalTokenizers(path, self.token_cache, self.token_cache.messages)
            if settings.tokenizer == "local" and path is not None
            else None
        )
        self.registry.listeners.append(self.engines_changed)
        for model in {*self.settings.models, *self.holds.named}:
            self.metrics.queued.labels(model)  # at 0 from the start: the autoscaler reads it

    def fail_held(self, model: str, error: Exception) -> int:
        """End every request waiting for ``model`` with ``error`` (its adapter cannot be loaded):
        those in the hold and those held in its flow queue."""
        return self.holds.fail(model, error) + self.flow.fail(model, error)

    def warm_tokenizers(self) -> None:
        """Load the local tokenizers of the models the engines serve now (``tokenizer: local``), so
        that no first request waits for one; a model whose files fail is left to the request path,
        which falls back to an engine's ``/tokenize``."""
        local = self.local_tokenizers
        if local is None:
            return
        for model in sorted({*self.registry.models(self.clock()), *self.settings.models}):
            try:
                local.warm(model)
            except LocalTokenizerError as err:
                log.warning("local tokenizer for %s not loaded at startup: %s", model, err)

    def engines_changed(self) -> None:
        """An engine may have come up or gone: release held requests, and queued ones where there is room."""
        registry, now = self.registry, self.clock()
        served = {m for e in registry.all() for m in e.models}
        for model in self.holds.see(served):
            self.metrics.queued.labels(model)
        for model in self.holds.waiting_models():
            if registry.candidates(model, now):
                self.holds.wake(model)
        self.flow.pump_all()
