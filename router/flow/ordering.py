"""Which waiting request goes next. Pure.

1. The highest priority class with anyone waiting.
2. Inside it, when several tenants wait: the tenant the fair share picks
   (:class:`kvstack.router.flow.fairness.FairShare`).
3. Inside that tenant's requests of that class, the model's ordering policy:

   - ``fcfs``: arrival order;
   - ``edf``: earliest start deadline (:func:`start_deadline`): the time by which a request must
     reach an engine to meet its class's TTFT objective, its arrival plus the objective less its
     own prefill. Inside one class every request has the same objective, so the arrival plus the
     objective alone would order exactly as ``fcfs``; a long uncached prompt needs to start sooner,
     and does. No objective: never due, so after every request with a deadline, in arrival order;
   - ``cheapest``: fewest uncached prompt tokens, with aging: each second waited counts as
     ``aging_tokens_per_s`` tokens fewer, so a long prompt is passed by at most what arrives
     cheaper in the time its own extra cost would take, and never starves. The aged cost
     ``cost - aging * (now - arrival)`` orders the same as ``cost + aging * arrival`` (the ``now``
     term is common to all), so a key never changes while it waits.

Ties go to the earlier arrival, then the lower sequence number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kvstack.router.flow.config import Ordering


@dataclass(frozen=True, slots=True)
class Waiting:
    """What ordering knows about one waiting request."""

    seq: int  # admission order; unique
    arrival: float
    priority: int
    tenant: str
    cost: float  # its prompt tokens not expected in any cache
    deadline: float = math.inf


def start_deadline(
    arrival: float, objective_s: float | None, cost: float, tokens_per_s_per_engine: float
) -> float:
    """When a request must reach an engine to meet ``objective_s``: its arrival plus the objective,
    less its own prefill (``cost`` uncached tokens at one engine's rate; none while no rate is
    known). ``inf`` without an objective. Fixed at arrival, so a key never changes while it waits."""
    if objective_s is None:
        return math.inf
    own = cost / tokens_per_s_per_engine if tokens_per_s_per_engine > 0 else 0.0
    return arrival + objective_s - own


def order_key(w: Waiting, ordering: Ordering, aging_tokens_per_s: float) -> tuple[float, float, int]:
    """Smaller goes first, inside one class and tenant."""
    if ordering == "edf":
        return (w.deadline, w.arrival, w.seq)
    if ordering == "cheapest":
        return (w.cost + aging_tokens_per_s * w.arrival, w.arrival, w.seq)
    return (w.arrival, w.arrival, w.seq)


def next_waiting(
    waiting: Iterable[Waiting],
    ordering: Ordering,
    aging_tokens_per_s: float,
    pick_tenant: Callable[[set[str]], str],
) -> Waiting | None:
    """The request to dispatch next (rules of the module docstring); None when nobody waits."""
    items = list(waiting)
    if not items:
        return None
    top = max(w.priority for w in items)
    band = [w for w in items if w.priority == top]
    tenants = {w.tenant for w in band}
    if len(tenants) > 1:
        chosen = pick_tenant(tenants)
        band = [w for w in band if w.tenant == chosen]
    return min(band, key=lambda w: order_key(w, ordering, aging_tokens_per_s))
