"""Flow control at run time: admission, the per-model queues, late binding and the engines' ledgers.

Per request the proxy calls :meth:`FlowControl.admit` (it returns a :class:`Grant` when the request
may go to an engine, after waiting in its model's queue if every engine was saturated, or if the
model had no ready engine and is held: scale from zero), routes it
among :meth:`FlowControl.with_room` with the policy's decision of that moment, and reports the
request's life there: :meth:`dispatched`, :meth:`first_token`, :meth:`finished`, :meth:`release`.

Late binding: a queued request is given its turn by :meth:`pump`, which runs whenever capacity may
have appeared: a request finished, the engine set changed, or (while anything waits) every scrape
interval, when scraped queue lengths and KV usage are fresh. A turn counts as *reserved* until the
request reaches its engine, so one free slot is never handed to two requests. The decisions are the
pure functions of :mod:`.saturation`, :mod:`.placement`, :mod:`.admission`, :mod:`.ordering` and
:mod:`.fairness`. This module keeps the queues and a request's passage; the engines' side (their
ledgers, which have room, where a request given its turn may go) is :mod:`.room`'s; what admission
predicts a first token from, and learns from each one, is :mod:`.forecast`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable

from prometheus_client import Gauge

from kvstack.common.errors import OpenAIError
from kvstack.router.engines import EngineRegistry, EngineState
from kvstack.router.exchange import RetryLater
from kvstack.router.flow.admission import SHED_MESSAGES, SHED_REASONS, Newcomer, decide, expiry
from kvstack.router.flow.config import FlowControlConfig, PriorityClass
from kvstack.router.flow.fairness import FairShare
from kvstack.router.flow.forecast import BASE_TTFT_S, Forecast
from kvstack.router.flow.grant import Grant
from kvstack.router.flow.ledger import Prefill
from kvstack.router.flow.ordering import Waiting, start_deadline
from kvstack.router.flow.queue import FlowQueue, Shed, Ticket
from kvstack.router.flow.room import Room
from kvstack.router.flow.saturation import waits_for_slot
from kvstack.router.hold import hold_full_error, hold_timeout_error
from kvstack.router.metrics import RouterMetrics
from kvstack.router.policies.base import ExpectedHit
from kvstack.router.policies.shared_device import busy_on_device

log = logging.getLogger(__name__)
# the rejections counter's reason for a flow-control refusal, where it is not the refusal's own
REJECTION_OF = {"wait_bound": "queue_timeout", "slo_prefill": "slo", "slo_room": "slo"}
OTHER_TENANT = "other"  # the metric label of every tenant not configured
# flow_shed's reasons: admission's refusals (a full hold is counted as the hold's rejection), and a
# queued request's end: it made way for another (displaced) or its wait ran out
FLOW_SHED_REASONS = (*(r for r in SHED_REASONS if r != "hold_full"), "displaced", "queue_timeout")


class FlowControl:
    """Flow control of one router (:mod:`kvstack.router.flow` for the rules)."""

    def __init__(
        self,
        config: FlowControlConfig,
        registry: EngineRegistry,
        metrics: RouterMetrics,
        clock: Callable[[], float],
        *,
        max_in_flight: int | None,
        queue_timeout_s: float,
        tick_s: float,
        hold_timeout_s: float = 600.0,
        max_held: int = 0,
    ) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.clock = clock
        self.queue_timeout_s = queue_timeout_s
        self.tick_s = tick_s
        self.hold_timeout_s = hold_timeout_s  # a held request's wait (scale from zero)
        self.max_held = max_held  # requests queued per model while it has no ready engine
        self.room = Room(config, metrics, clock, max_in_flight)
        self.weights = {t.name: t.weight for t in config.tenants}
        self.tenant_class = {t.name: t.default_class for t in config.tenants if t.default_class}
        self.queues: dict[str, FlowQueue] = {}
        self.reserved: dict[str, int] = {}
        self.forecast = Forecast(
            self.room, metrics, config.saturation.learn_weight, config.saturation.overload_memory_s
        )
        self._ids = itertools.count(1)
        self._ticker: asyncio.Task[None] | None = None
        for cls in config.classes:
            for reason in FLOW_SHED_REASONS:
                metrics.flow_shed.labels(reason, cls.name)

    # ------------------------------------------------------------------ classification

    def classify(
        self, tenant_header: str | None, priority_header: str | None, key: str
    ) -> tuple[str, PriorityClass]:
        """(tenant, class) of a request: 400 naming the header for a class that does not exist."""
        tenant = tenant_header or key
        name = priority_header or self.tenant_class.get(tenant) or self.config.default_class
        cls = self.config.class_named(name)
        if cls is None:
            known = ", ".join(c.name for c in self.config.classes)
            raise OpenAIError(
                400, f"unknown priority class {name!r} in {self.config.priority_header}; one of: {known}"
            )
        return tenant, cls

    # ------------------------------------------------------------------ engines

    def with_room(
        self,
        candidates: list[EngineState],
        grant: Grant | None = None,
        hits: Callable[[EngineState], ExpectedHit] | None = None,
        prompt_tokens: float = 0.0,
    ) -> list[EngineState]:
        """The candidates the policy may choose among for ``grant`` now (:meth:`Room.with_room`)."""
        model, priority = ("", None) if grant is None else (grant.model, grant.priority)
        return self.room.with_room(candidates, model, priority, hits, prompt_tokens)

    def room_for(self, model: str, candidates: list[EngineState], now: float, priority: int) -> int:
        """Engines of ``candidates`` that can take one more request of ``priority``, less the turns
        already given."""
        return self.room.unsaturated(candidates, now, priority) - self.reserved.get(model, 0)

    # ------------------------------------------------------------------ admission

    def queue_for(self, model: str) -> FlowQueue:
        queue = self.queues.get(model)
        if queue is None:
            flow = self.config.for_model(model)
            fair = FairShare(self.weights)
            aging = self.config.saturation.prefill_tokens_per_s
            queue = self.queues[model] = FlowQueue(
                flow.ordering, flow.max_queue, flow.max_queue_tokens, fair, aging
            )
        return queue

    async def admit(
        self,
        model: str,
        tenant: str,
        cls: PriorityClass,
        cost: float,
        candidates: list[EngineState],
        prompt_tokens: float | None = None,
    ) -> Grant:
        """Wait for the request's turn; raises :class:`RetryLater` (429) when it is refused.

        With no ``candidates`` the model is held (the caller holds only a model that may scale from
        zero): the request waits in the queue as any other, up to ``hold_timeout_s``, bounded by
        ``max_held``, and :meth:`pump` gives it its turn once an engine is ready (503 with
        Retry-After when none came up in time)."""
        self.pump(model)  # room a fresh scrape shows is the waiting requests' before a newcomer's
        now = self.clock()
        self.room.seen[cls.priority] = now
        label = tenant if tenant in self.weights else OTHER_TENANT
        grant = Grant(
            next(self._ids), model, cls.name, cls.priority, tenant, label, cls.ttft_objective_s, cost
        )
        queue = self.queue_for(model)
        room = self.room_for(model, candidates, now, cls.priority) > 0
        cap = self.forecast.capacity(model, candidates, now, room)
        grant.correction = cap.correction
        decision = decide(
            Newcomer(tenant, cls.priority, cost, cls.ttft_objective_s, prompt_tokens),
            queue.state_for(cls.priority, self.max_held, self.queue_timeout_s),
            cap,
        )
        grant.predicted_ttft_s, grant.admission = decision.predicted_ttft_s, decision.reason
        self.forecast.saw(model, decision, now)
        if decision.outcome != "dispatch":  # what admission saw of a wait (kvstack bench gpu's router log)
            log.debug(
                "flow admission %s: predicted %s s, turns/s %s, correction %.2f, in flight %.0f tokens, "
                "cost %.0f tokens, rate %.0f tokens/s over %d engines, queued %d",
                decision.reason,
                decision.predicted_ttft_s,
                cap.turns_per_s,
                cap.correction,
                cap.prefill_in_flight,
                cost,
                cap.prefill_tokens_per_s,
                cap.engines,
                len(queue),
            )
        held = decision.reason == "held"
        if decision.reason == "hold_full":
            self.metrics.reject("hold_full")
            raise hold_full_error(model)
        if decision.outcome == "dispatch":
            self._reserve(grant)
            self.metrics.flow_queue_wait.labels(self.metrics.model_label(model), cls.name).observe(0.0)
            return grant
        if decision.outcome == "shed":
            raise self._shed(decision.reason, grant, decision.retry_after_s)
        if decision.victim_priority is not None:
            victim = queue.victim(decision.victim_priority, decision.victim_tenant)
            if victim is not None and self._dequeue(model, victim) and not victim.future.done():
                victim.future.set_exception(Shed("displaced"))
        deadline = start_deadline(now, cls.ttft_objective_s, cost, cap.per_engine_tokens_per_s)
        waiting = Waiting(grant.id, now, cls.priority, tenant, cost, deadline)
        ticket = Ticket(waiting, cls.name, label)
        grant.position = queue.add(ticket)
        self._gauge(model, ticket).inc()
        self._start_ticker()
        timeout = self.hold_timeout_s if held else self.queue_timeout_s
        try:
            async with asyncio.timeout(timeout):
                await ticket.future
        except TimeoutError:
            self._dequeue(model, ticket)
            if expiry(held, len(self.registry.candidates(model, self.clock()))) == "hold_timeout":
                self.metrics.reject("hold_timeout")
                raise hold_timeout_error(model, timeout) from None
            raise self._shed("queue_timeout", grant, 1.0) from None
        except Shed as shed:
            raise self._shed(shed.reason, grant, 1.0) from None
        except BaseException:
            future = ticket.future
            # not in the queue, its future done with no error (:meth:`fail` sets one): its turn came
            if (
                not self._dequeue(model, ticket)
                and future.done()
                and not future.cancelled()
                and future.exception() is None
            ):
                grant.reserved = True  # its turn came (pump reserved it) as its client left: pass it on
                self.release(grant)
            raise
        grant.reserved = True  # pump reserved the turn when it woke us
        grant.queue_wait_s = self.clock() - now
        self.metrics.flow_queue_wait.labels(self.metrics.model_label(model), cls.name).observe(
            grant.queue_wait_s
        )
        return grant

    def fail(self, model: str, error: Exception) -> int:
        """End every request waiting for ``model`` with ``error`` (its adapter cannot be loaded);
        returns how many."""
        queue = self.queues.get(model)
        failed = 0
        for ticket in list(queue.tickets.values()) if queue is not None else []:
            if self._dequeue(model, ticket) and not ticket.future.done():
                ticket.future.set_exception(error)
                failed += 1
        return failed

    def _shed(self, reason: str, grant: Grant, retry_after_s: float) -> RetryLater:
        self.metrics.flow_shed.labels(reason, grant.class_name).inc()
        # the rejections counter's reasons: a predicted wait past the queue's bound is its timeout, told
        # early; a miss by the request's own prefill is a missed objective (flow_shed tells them apart)
        self.metrics.reject(REJECTION_OF.get(reason, reason))
        message = SHED_MESSAGES[reason].format(cls=grant.class_name, model=grant.model)
        return RetryLater(429, message, retry_after_s)

    def _gauge(self, model: str, ticket: Ticket) -> Gauge:
        return self.metrics.flow_queue_length.labels(
            self.metrics.model_label(model), ticket.class_name, ticket.tenant_label
        )

    def _dequeue(self, model: str, ticket: Ticket) -> bool:
        if not self.queue_for(model).remove(ticket):
            return False
        self._gauge(model, ticket).dec()
        return True

    def _reserve(self, grant: Grant) -> None:
        grant.reserved = True
        self.reserved[grant.model] = self.reserved.get(grant.model, 0) + 1

    def _unreserve(self, grant: Grant) -> None:
        if grant.reserved:
            grant.reserved = False
            self.reserved[grant.model] -= 1

    # ------------------------------------------------------------------ a request's life at its engine

    def dispatched(
        self,
        grant: Grant,
        engine: EngineState,
        uncached: float,
        streamed: bool,
        max_tokens: int | None = None,
    ) -> None:
        """Sent to ``engine``, with ``uncached`` prompt tokens to prefill there (and up to
        ``max_tokens`` to generate: the first such request seeds the model's time at an engine)."""
        now = self.clock()
        if grant.model not in self.room.service_s and max_tokens:
            self.room.service_s[grant.model] = max_tokens * self.config.saturation.decode_step_s
        self._unreserve(grant)
        flow = self.room.ledger(engine)
        grant.engine, grant.dispatched_at, grant.uncached = engine.url, now, uncached
        grant.backlog_at_dispatch = flow.backlog(now)
        grant.waited_for_slot = waits_for_slot(
            engine.in_flight, flow.slots, flow.waiting(engine), engine.kv_cache_usage
        )
        grant.device_busy = busy_on_device(engine, self.registry.all())
        expected = (grant.backlog_at_dispatch + uncached) / self.room.rate(engine)
        due = now + expected + self.room.limits.prefill_target_s
        flow.prefill[grant.id] = Prefill(uncached, due, streamed, grant.priority, grant.tenant)

    def first_token(self, grant: Grant, ttft_s: float) -> None:
        """The first token came back (``ttft_s`` from arrival at the router): the prefill is over."""
        now = self.clock()
        cls = grant.class_name
        model = self.metrics.model_label(grant.model)
        self.forecast.first_token(grant, ttft_s)
        if grant.objective_s is not None:
            counter = (
                self.metrics.flow_goodput
                if ttft_s <= grant.objective_s
                else self.metrics.flow_objective_misses
            )
            counter.labels(model, cls).inc()
        engine = self.registry.get(grant.engine or "")
        if engine is None:
            return
        took_s = now - grant.dispatched_at - BASE_TTFT_S
        work = grant.backlog_at_dispatch + grant.uncached
        learn = not grant.waited_for_slot
        self.room.prefill_done(engine, grant.id, work, took_s, learn=learn, busy=grant.device_busy)
        self.pump(grant.model)

    def finished(self, grant: Grant, engine: EngineState) -> None:
        """One try at ``engine`` ended (its in-flight count is already down)."""
        flow = self.room.ledger(engine)
        flow.prefill.pop(grant.id, None)
        flow.waiting(engine)
        flow.ended += 1
        self.room.served(grant.model, self.clock() - grant.dispatched_at)
        self.pump_models(engine.models)

    def release(self, grant: Grant) -> None:
        """The request is done with flow control: a turn it never used goes to the next in line."""
        if grant.reserved:
            self._unreserve(grant)
            self.pump(grant.model)

    # ------------------------------------------------------------------ late binding

    def pump(self, model: str) -> None:
        """Give turns to waiting requests of ``model`` while its engines have room."""
        queue = self.queues.get(model)
        if not queue:
            return
        now = self.clock()
        candidates = self.registry.candidates(model, now)
        while candidates:
            head = queue.peek_next()  # its class decides how much of an engine it may fill
            if head is None or self.room_for(model, candidates, now, head.waiting.priority) <= 0:
                break
            ticket = queue.pop_next()
            if ticket is None:
                return
            self._gauge(model, ticket).dec()
            if ticket.future.done():
                continue
            ticket.future.set_result(None)
            self.reserved[model] = self.reserved.get(model, 0) + 1  # the grant's, set by its waiter
            self.forecast.turns.given(model, now)
        if not queue:
            self.forecast.turns.emptied(model)  # a later backlog is measured afresh

    def pump_models(self, models: Iterable[str]) -> None:
        for model in models:
            self.pump(model)

    def pump_all(self) -> None:
        """The engine set changed (or a scrape interval passed): room may have appeared anywhere;
        the ledgers of engines that left go."""
        self.room.forget_gone(self.registry)
        self.pump_models(list(self.queues))

    def _start_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        """While anything waits: look again every scrape interval (scraped signals change there)."""
        while any(len(q) for q in self.queues.values()):
            await asyncio.sleep(self.tick_s)
            self.pump_all()
            if log.isEnabledFor(logging.DEBUG):
                self._log_waiting()

    def _log_waiting(self) -> None:
        """Why requests still wait, once a tick: each engine's saturation and the queue's turn rate."""
        now = self.clock()
        for model, queue in self.queues.items():
            head = queue.peek_next()
            candidates = self.registry.candidates(model, now)
            if head is None or not candidates:
                continue
            limits = self.room.limits_for(head.waiting.priority, now)
            verdicts = self.room.verdicts(candidates, limits, now)
            log.debug(
                "flow waiting: %d queued, turns/s %s, engines %s",
                len(queue),
                self.forecast.turns_per_s(model, candidates),
                {
                    e.name: (v.reason, e.kv_cache_usage, e.in_flight)
                    for e, v in zip(candidates, verdicts, strict=True)
                },
            )

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
