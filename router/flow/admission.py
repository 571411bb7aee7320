"""Admit, queue or shed one request for a model. Pure: every outcome has a typed reason.

In this order:

0. no engine of the model is ready (it scales from zero, or its LoRA adapter is being loaded: the
   scale-from-zero hold, :mod:`kvstack.router.hold`): ``held``: it waits in the queue like any
   queued request (its class, its tenant's share, its position), bounded by the hold's own bound
   ``max_held`` instead of the queue's (``hold_full``: 429); nothing is predicted (no engine to
   predict from), so no objective refuses it: its user asked to wait for the start;
1. ``room``: an engine of the model has room and nobody of its class or a higher one waits:
   dispatch now (below saturation flow control costs nothing). One exception, ``slo_room``: while
   the model is ``overloaded`` (a request of it was queued or refused lately,
   :attr:`Capacity.overloaded`), a *warm* request (at most :data:`WARM_SHARE` of its prompt left to
   prefill) that would meet its class's objective on an idle engine but is predicted to miss it
   behind the prefill already sent (as rule 2a judges a queued one) is refused, unless its tenant
   holds less than its weighted share of that prefill (the wait is other tenants' work; without this
   the fairness benchmark refused tenant B more than the flooding A). Above capacity room
   lasts until the next arrival, and on two LMCache engines on an H100 at 2x, 15 of the 17 warm
   turns dispatched with room while predicted late were late, while 38 of the 57 cold first turns
   predicted late were on time (the prediction adds their prefill to the work in flight, and the
   engine's chunked prefill overlaps them; bench-results/flow, session 30). So a cold prompt is
   dispatched (refusing those late by their own prefill while overloaded was tried in session 20
   and reverted), and below saturation (nothing queued or refused lately) room always dispatches;
2. its class has a TTFT objective and its predicted TTFT misses it. The prediction is the wait for
   its turn (the prefill work ahead of it, sent and not prefilled plus waiting in its class or
   above, at the cluster's prefill rate; or, when longer, the requests ahead and its own turn at
   the rate the queue gives turns), plus its own prefill at one engine's rate, plus the base TTFT
   (:func:`predict_ttft`). The queued part ahead is what the fair shares put before it
   (:func:`kvstack.router.flow.fairness.fair_work_ahead`): a tenant under its share is served
   before most of the backlog of a tenant over it, so the tenant over its share is the one refused.
   Why it misses decides:

   a. ``slo``: on an idle engine it would meet the objective (:func:`predict_alone`): it misses
      because of the wait: 429, its capacity goes to requests that can still be on time;
   b. ``slo_prefill``: it would miss the objective on an idle engine too (its own prefill is longer:
      a cold 3,000-word turn on a shared GPU), and others are waiting for the capacity it would take
      (anyone queued, or a wait that alone misses the objective: the model is saturated): 429.
      Refusing it is what keeps their first tokens on time;
   c. ``queued_prefill``: it would miss on an idle engine too, and nobody waits and the wait alone
      meets the objective (below saturation): refusing it helps no other request, so it is queued
      (rules 3 and 4 still apply) and served late rather than refused;
3. ``wait_bound``: its predicted TTFT is longer than the queue lets a request wait
   (``max_wait_s``, the router's ``queue_timeout_s``): 429 now, whatever its class's objective (with
   none, this bound is the only promise): it would wait out the whole bound and get the same 429 then
   (on two simulators at KV pressure, bench-results/lmcache section 8, 5 requests did, after 30 s);
   an unmeasured turn rate predicts no wait for slots, so this refuses only what the queue's own
   measurements say cannot be served in time;
4. the queue is full (by count, or by prompt tokens when something waits already):

   a. ``displace_lower``: someone of a lower class waits: queue it, and the newest request of the
      lowest class gets the 429 instead (a flood of batch work never locks interactive work out);
   b. ``over_share``: its tenant would hold more than its weighted share of the queue: 429;
   c. ``displace_over_share``: another tenant holds more than its share: queue it, and that tenant's
      newest request of the newcomer's class (the lowest waiting) gets the 429;
   d. ``queue_full``: 429;
5. ``queued``: it waits for an engine with room.

A 429 carries ``Retry-After``: the time the cluster needs to prefill what is ahead of the
newcomer (the work in flight, and the queued work of its class or above that the fair shares serve
before it; at least :data:`MIN_RETRY_AFTER_S`, at most :data:`MAX_RETRY_AFTER_S`; exact in
``retry-after-ms``, rounded up in ``Retry-After``). Lower classes' queued work is not ahead: an
interactive request refused behind a batch flood is told when it would be served, not when the
flood drains (in the flow benchmark's priority scenario, retries waited 2.5-4 s with the
whole queue counted, 1 s with what is ahead).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from kvstack.router.flow.fairness import below_share, fair_work_ahead, over_share

Outcome = Literal["dispatch", "queue", "shed"]
Reason = Literal[
    "held",
    "hold_full",
    "room",
    "slo_room",
    "queued",
    "queued_prefill",
    "slo",
    "slo_prefill",
    "wait_bound",
    "displace_lower",
    "over_share",
    "displace_over_share",
    "queue_full",
]
SHED_REASONS: tuple[Reason, ...] = (
    "hold_full",
    "slo",
    "slo_room",
    "slo_prefill",
    "wait_bound",
    "over_share",
    "queue_full",
)
# what a client refused for each reason reads (``{cls}``: its class, ``{model}``: its model)
SHED_MESSAGES = {
    "slo": "the {cls} class's time-to-first-token objective cannot be met now; try again later",
    "slo_room": "the {cls} class's time-to-first-token objective cannot be met now; try again later",
    "slo_prefill": "this prompt's own prefill takes longer than the {cls} class's time-to-first-token "
    "objective, and other requests are waiting for the capacity it would take; try again later",
    "over_share": "the queue for {model} is full and this tenant holds more than its share of it",
    "queue_full": "too many requests queued for {model}",
    "displaced": "this request made way for a higher class or a tenant under its share in the full "
    "queue for {model}",
    "queue_timeout": "timed out waiting for capacity for {model}",
    "wait_bound": "the wait for capacity for {model} is predicted to exceed the queue's bound; "
    "try again later",
}
# why a queued request's wait ran out: no engine of its model came up (503, come back in a while), or
# its engines stayed saturated (429)
Expiry = Literal["hold_timeout", "queue_timeout"]
MAX_RETRY_AFTER_S = 60.0
# a request with at most this share of its prompt left to prefill is warm (rule 1's exception): a later
# turn of a chat (a few hundred new tokens of thousands) is; a first turn over a shared system prompt
# (two thirds of it new in the benchmarks' multi-round chat) is not
WARM_SHARE = 0.5
# Under a TTFT objective of about a second, a wait rounded up to whole seconds is the objective
# spent: the answer carries the exact wait as ``retry-after-ms`` too (the openai SDK reads it
# first), and this floor keeps a refused client from coming back at once.
MIN_RETRY_AFTER_S = 0.25


@dataclass(frozen=True, slots=True)
class Newcomer:
    tenant: str
    priority: int
    cost: float  # uncached prompt tokens (an upper bound: the prompt's length)
    objective_s: float | None  # the class's TTFT objective
    prompt_tokens: float | None = None  # the whole prompt; None: unknown (taken as cold)


@dataclass(frozen=True, slots=True)
class QueueState:
    """The model's queue as the newcomer finds it."""

    count: int
    tokens: float  # sum of the waiting requests' costs
    max_count: int
    max_tokens: int
    tokens_ahead: float  # costs of the waiting requests of the newcomer's class or above
    waiting_ahead: int  # how many of them
    lowest_priority: int | None  # of the waiting requests; None: nobody waits
    work: Mapping[str, float]  # per waiting tenant: its costs + request_tokens per request
    weights: Mapping[str, float]
    request_tokens: float = 256.0
    max_held: int = 0  # requests that may wait while the model has no ready engine (rule 0)
    max_wait_s: float | None = None  # the longest a queued request may wait (rule 3); None: unbounded


@dataclass(frozen=True, slots=True)
class Capacity:
    """The model's engines together."""

    engines: int  # ready ones; 0: the model is held (rule 0)
    room: bool  # some engine has room now
    prefill_tokens_per_s: float  # summed over the engines
    prefill_in_flight: float  # uncached tokens sent to them and not yet prefilled
    base_ttft_s: float = 0.011
    # turns the queue has been giving per second while it was not empty (measured); None: unknown.
    # Engines full of long decodes free slots slower than their prefill rate says
    turns_per_s: float | None = None
    # actual over predicted TTFT of queued requests, learnt (:func:`learn_correction`): what the
    # model above misses (decode steps between prefill chunks, a shared GPU) scales its wait and prefill
    correction: float = 1.0
    # a request of the model was queued or refused within the last ``overload_memory_s`` (config):
    # above capacity, room comes and goes between arrivals (rule 1's exception)
    overloaded: bool = False
    # ``prefill_in_flight`` by tenant, while ``overloaded`` (else empty): whose work the wait is
    prefill_by_tenant: Mapping[str, float] = field(default_factory=dict)

    @property
    def per_engine_tokens_per_s(self) -> float:
        """One engine's prefill rate (the mean of the model's); 0 with no engine."""
        return self.prefill_tokens_per_s / self.engines if self.engines > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    reason: Reason
    predicted_ttft_s: float | None
    retry_after_s: float = 1.0
    victim_priority: int | None = None  # displace: the newest waiting request of this class ...
    victim_tenant: str | None = None  # ... (and of this tenant, when set) is shed instead


def predict_ttft(cost: float, tokens_ahead: float, cap: Capacity, waiting_ahead: int = 0) -> float | None:
    """Seconds to first token if it is queued now; None with no engine to predict from.

    The wait for its turn is the longer of two: the prefill work ahead at the cluster's prefill
    rate, and the requests ahead at the rate the queue has been giving turns (when measured).
    """
    if cap.engines <= 0 or cap.prefill_tokens_per_s <= 0:
        return None
    return cap.base_ttft_s + cap.correction * (
        _wait_for_turn(tokens_ahead, cap, waiting_ahead) + cost / cap.per_engine_tokens_per_s
    )


def _wait_for_turn(tokens_ahead: float, cap: Capacity, waiting_ahead: int) -> float:
    """Uncorrected seconds until a request queued now gets an engine (``prefill_tokens_per_s`` > 0)."""
    by_tokens = (cap.prefill_in_flight + tokens_ahead) / cap.prefill_tokens_per_s
    # its own turn too: with every engine busy, even the head of the queue waits for a slot to free
    by_turns = (waiting_ahead + 1) / cap.turns_per_s if cap.turns_per_s and not cap.room else 0.0
    return max(by_tokens, by_turns)


def predict_alone(cost: float, cap: Capacity) -> float | None:
    """Seconds to first token on an idle engine of the model (nothing ahead, a slot free): the floor
    its own prefill sets, which no admission decision can lower."""
    return predict_ttft(cost, 0.0, replace(cap, room=True, prefill_in_flight=0.0, turns_per_s=None))


def _refused_with_room(new: Newcomer, predicted: float | None, queue: QueueState, cap: Capacity) -> bool:
    """Rule 1's exception: ``new`` is warm, its tenant holds at least its share of the prefill in
    flight, and it misses its class's objective by the wait (``predicted``) though it would meet
    it on an idle engine (rule 2a's test)."""
    if not cap.overloaded or new.objective_s is None or predicted is None or predicted <= new.objective_s:
        return False
    if new.prompt_tokens is None or new.cost > WARM_SHARE * new.prompt_tokens:
        return False
    if below_share(new.tenant, cap.prefill_by_tenant, queue.weights):
        return False
    alone = predict_alone(new.cost, cap)
    return alone is not None and alone <= new.objective_s


MIN_CORRECTION, MAX_CORRECTION = 0.25, 4.0


def learn_correction(
    current: float, actual_s: float, predicted_s: float, base_s: float, weight: float
) -> float:
    """The prediction's correction factor after one queued request's first token (an EWMA of ``weight``).

    ``predicted_s`` is the uncorrected prediction it was admitted on; the sample is the part above
    the base TTFT, actual over predicted, clipped to a quarter to four times (one stalled or lucky
    request cannot swing admission), and a prediction of no wait and no prefill teaches nothing.
    """
    if weight <= 0 or predicted_s - base_s <= 1e-6:
        return current
    sample = min(MAX_CORRECTION, max(MIN_CORRECTION, (actual_s - base_s) / (predicted_s - base_s)))
    return (1 - weight) * current + weight * sample


def retry_after(ahead_tokens: float, cap: Capacity, waiting_ahead: int = 0) -> float:
    """Seconds until the work ahead (in flight, and ``ahead_tokens`` of queued work) lets it in, as
    :func:`predict_ttft` predicts that wait (the learnt correction included: a retry told to come
    back before the wait it was refused for has passed is refused again), at least
    :data:`MIN_RETRY_AFTER_S` and at most :data:`MAX_RETRY_AFTER_S` (1 s with no measured rate)."""
    if cap.prefill_tokens_per_s <= 0:
        return 1.0
    wait = cap.correction * _wait_for_turn(ahead_tokens, cap, waiting_ahead)
    return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, wait))


def most_over_share(queue: QueueState, new: Newcomer) -> str | None:
    """The tenant (not the newcomer's) furthest over its weighted share of the queue with the
    newcomer in it, if any is."""
    total = sum(queue.work.values()) + new.cost + queue.request_tokens
    weight_sum = sum(queue.weights.get(t, 1.0) for t in {*queue.work, new.tenant})
    if total <= 0 or weight_sum <= 0:
        return None
    excess = {
        t: w - total * queue.weights.get(t, 1.0) / weight_sum
        for t, w in queue.work.items()
        if t != new.tenant
    }
    worst = max(sorted(excess), key=lambda t: excess[t], default=None)
    return worst if worst is not None and excess[worst] > 1e-9 else None


def fair_fraction(new: Newcomer, queue: QueueState) -> float:
    """The share of the queued work ahead that the fair shares serve before ``new`` (1: all)."""
    total = sum(queue.work.values())
    if total <= 0:
        return 1.0
    ahead = fair_work_ahead(new.tenant, new.cost, queue.work, queue.weights, queue.request_tokens)
    return min(1.0, ahead / total)


def expiry(held: bool, engines: int) -> Expiry:
    """Why a queued request's wait ran out: ``hold_timeout`` when it was held (admitted while its
    model had no ready engine) and still no engine is ready, else ``queue_timeout``."""
    return "hold_timeout" if held and engines == 0 else "queue_timeout"


def decide(new: Newcomer, queue: QueueState, cap: Capacity) -> Decision:
    """The rules of the module docstring."""
    if cap.engines <= 0:
        if queue.count < queue.max_held:
            return Decision("queue", "held", None)
        return Decision("shed", "hold_full", None)
    if cap.room and queue.waiting_ahead == 0:
        predicted = predict_ttft(new.cost, 0.0, cap)
        if _refused_with_room(new, predicted, queue, cap):
            return Decision("shed", "slo_room", predicted, retry_after(0.0, cap))
        return Decision("dispatch", "room", predicted)
    share = fair_fraction(new, queue)
    ahead = math.ceil(queue.waiting_ahead * share - 1e-9)
    predicted = predict_ttft(new.cost, queue.tokens_ahead * share, cap, ahead)
    wait = retry_after(queue.tokens_ahead * share, cap, ahead)
    late_alone = False  # rule 2c: it misses its objective by its own prefill, and nobody else waits
    if new.objective_s is not None and predicted is not None and predicted > new.objective_s:
        alone = predict_alone(new.cost, cap)
        if alone is None or alone <= new.objective_s:
            return Decision("shed", "slo", predicted, wait)
        # a request with nothing to prefill, in its place: late too means the model is saturated
        no_prefill = predict_ttft(0.0, queue.tokens_ahead * share, cap, ahead)
        if queue.count > 0 or (no_prefill is not None and no_prefill > new.objective_s):
            return Decision("shed", "slo_prefill", predicted, wait)
        late_alone = True
    if queue.max_wait_s is not None and predicted is not None and predicted > queue.max_wait_s:
        return Decision("shed", "wait_bound", predicted, wait)
    full = queue.count + 1 > queue.max_count or (
        queue.count > 0 and queue.tokens + new.cost > queue.max_tokens
    )
    if not full:
        return Decision("queue", "queued_prefill" if late_alone else "queued", predicted)
    if queue.lowest_priority is not None and queue.lowest_priority < new.priority:
        return Decision("queue", "displace_lower", predicted, victim_priority=queue.lowest_priority)
    if over_share(new.tenant, new.cost, queue.work, queue.weights, queue.request_tokens):
        return Decision("shed", "over_share", predicted, wait)
    # only a request of the newcomer's own class may make way for it (a lower class went in a.)
    other = most_over_share(queue, new) if queue.lowest_priority == new.priority else None
    if other is not None:
        return Decision(
            "queue", "displace_over_share", predicted, victim_priority=new.priority, victim_tenant=other
        )
    return Decision("shed", "queue_full", predicted, wait)
