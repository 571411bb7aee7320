"""What admission predicts a request's first token from, and what each first token teaches it.

Admission (:func:`.admission.decide`) sees a model's engines as one :class:`.admission.Capacity`:
how many are ready, whether one has room for the request's class, their summed prefill rate, the
uncached prefill sent to them and not done, the rate the model's queue gives turns
(:class:`.turn_rate.TurnRate`), a correction learnt from the first tokens of queued requests, and
whether the model was overloaded lately (a request of it queued or refused, :meth:`Forecast.saw`).
:class:`Forecast` gathers those inputs from the engines' ledgers (:class:`.room.Room`), and learns
from each first token: the actual over predicted TTFT (the prediction-ratio histogram, and the
model's correction, :func:`.admission.learn_correction`). Only queued requests teach the correction:
the predictions that admit or refuse are of requests that would wait.
"""

from __future__ import annotations

import math

from kvstack.router.engines import EngineState
from kvstack.router.flow.admission import Capacity, Decision, learn_correction
from kvstack.router.flow.grant import Grant
from kvstack.router.flow.room import Room
from kvstack.router.flow.turn_rate import TurnRate
from kvstack.router.metrics import RouterMetrics

BASE_TTFT_S = 0.011  # a full prefix hit on an H200 still takes ~11 ms (tests/reference)


class Forecast:
    """The prediction's inputs and its learning, per model, for one router's flow control."""

    def __init__(
        self, room: Room, metrics: RouterMetrics, learn_weight: float, overload_memory_s: float = 0.0
    ) -> None:
        self.room = room
        self.metrics = metrics
        self.learn_weight = learn_weight
        self.overload_memory_s = overload_memory_s
        # per model, when a request of it was last queued or refused (Capacity.overloaded)
        self.overloaded_at: dict[str, float] = {}
        self.turns = TurnRate()  # how fast each model's queue gives turns
        # per model, actual over predicted TTFT of queued requests (admission.learn_correction)
        self.correction: dict[str, float] = {}

    def turns_per_s(self, model: str, candidates: list[EngineState]) -> float | None:
        """The rate the model's queue gives turns (:class:`.turn_rate.TurnRate`)."""
        # requests running at the engines: as scraped (waiting ones free no slot), else our count
        running = sum(e.in_flight if e.num_running is None else e.num_running for e in candidates)
        return self.turns.per_s(model, running, self.room.service_s.get(model))

    def capacity(self, model: str, candidates: list[EngineState], now: float, room: bool) -> Capacity:
        """The model's ``candidates`` as admission sees them now (``room``: one can take the request)."""
        overloaded = now - self.overloaded_at.get(model, -math.inf) < self.overload_memory_s
        by_tenant: dict[str, float] = {}
        if overloaded:  # only rule 1's exception reads it
            for e in candidates:
                self.room.ledger(e).backlog_by_tenant(now, by_tenant)
        return Capacity(
            engines=len(candidates),
            room=room,
            prefill_tokens_per_s=sum(self.room.rate(e) for e in candidates),
            prefill_in_flight=sum(self.room.ledger(e).backlog(now) for e in candidates),
            base_ttft_s=BASE_TTFT_S,
            turns_per_s=self.turns_per_s(model, candidates),
            correction=self.correction.get(model, 1.0),
            overloaded=overloaded,
            prefill_by_tenant=by_tenant,
        )

    def saw(self, model: str, decision: Decision, now: float) -> None:
        """Admission's ``decision`` for a request of ``model``: one queued or refused while the model
        has engines marks it overloaded (a held request only waits for an engine to start). A
        refusal with room (``slo_room``) does not: its retries would keep the model overloaded by
        their own refusals (on simulators, once, 217 of them at 2x and half the goodput)."""
        if decision.outcome != "dispatch" and decision.reason not in ("held", "hold_full", "slo_room"):
            self.overloaded_at[model] = now

    def first_token(self, grant: Grant, ttft_s: float) -> None:
        """``grant``'s first token came ``ttft_s`` after its arrival: how its prediction fared."""
        if not grant.predicted_ttft_s:
            return
        self.metrics.flow_ttft_ratio.labels(grant.class_name).observe(ttft_s / grant.predicted_ttft_s)
        if grant.position > 0:  # it waited: the predictions that admit or shed are of such requests
            raw = BASE_TTFT_S + (grant.predicted_ttft_s - BASE_TTFT_S) / grant.correction
            self.correction[grant.model] = learn_correction(
                self.correction.get(grant.model, 1.0), ttft_s, raw, BASE_TTFT_S, self.learn_weight
            )
