"""When a refused request is told to come back: its own wait, or later, behind the retries already
told (pure, but for the small schedule the caller keeps per model).

A burst of refusals sees one queue state, so :func:`admission.decide` tells each the same wait.
Clients that honour ``Retry-After`` exactly (the openai SDK waits it without jitter) then come back
together and meet the burst again: on simulators sharing one GPU at twice their capacity, retries
told the same ``retry-after-ms`` arrived within 50 ms of each other, were admitted together on the
engine holding their sessions, and took 3-8 s to their first tokens against 0.6-0.9 s predicted
(bench-results/flow/README.md, the device A/B).

So each refusal is told the later of its own wait and the next free return slot, and books the
slot after it: as long as the prefill it brings back takes the model's engines together (its cost
at their summed rate). Retries then return at the pace the engines can take them. A return later
than the cap is told the cap and books nothing: the client may not come back at all.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Return:
    retry_after_s: float  # what the refusal says
    next_free: float  # the schedule after it: the earliest return not yet booked (router clock)


def schedule_return(now: float, wait_s: float, cost_s: float, next_free: float, *, max_s: float) -> Return:
    """The return of a request refused at ``now`` whose own wait is ``wait_s`` and whose prefill
    takes ``cost_s`` of the engines' time, given the schedule's ``next_free`` (any past time: empty)."""
    at = max(now + wait_s, next_free)
    if at - now > max_s:
        return Return(max_s, next_free)
    return Return(at - now, at + max(0.0, cost_s))


class ReturnSchedule:
    """The next free return per model (the only state: one float each)."""

    def __init__(self, max_s: float) -> None:
        self.max_s = max_s
        self._next_free: dict[str, float] = {}

    def tell(self, model: str, now: float, wait_s: float, cost_s: float) -> float:
        """Seconds the refused request is told to wait; books its return."""
        got = schedule_return(now, wait_s, cost_s, self._next_free.get(model, now), max_s=self.max_s)
        self._next_free[model] = got.next_free
        return got.retry_after_s
