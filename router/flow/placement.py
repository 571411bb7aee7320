"""Whether a request goes to the saturated engine holding its prefix rather than to one with room. Pure.

Late binding routes a request among the engines with room. When the engine holding the longest
cached prefix of its prompt is saturated, sending it there anyway can beat a cold prefill
elsewhere: its first token comes after that engine's wait and the little left uncached, against
the other engine's backlog and the larger part it does not hold. The wait there is

- its prefill backlog (uncached tokens sent and not yet prefilled, at its rate), always;
- plus, when its batch is full (saturation ``full``, or ``waiting`` / ``overdue`` with its KV
  nearly full or not scraped), the wait for a batch slot: the requests waiting there and this one,
  each freed as one of its running requests ends, at ``in flight / time at an engine`` per second
  (Little's law, :func:`slot_wait_s`). Requests waiting in an engine with KV to spare wait for a
  step's token budget (chunked prefill), not a slot: the backlog is their wait.

The request goes to the hit engine when its first token is expected sooner there, except when the
engine with room is the last one with room and the hit engine is queueing by its own signals
(``last_room``: saturated as ``overdue`` or ``waiting``): then it goes there only when that also
costs less counting the delay its own prefill adds to the next request (its uncached tokens at the
engine's rate, :meth:`Option.cost_s`). Going cold puts the prefill of everything the hit engine
holds back on the cluster: on the last engine with room the requests after it wait behind it.
Weighing only the first token there sent a warm turn cold whenever its hit engine's backlog was a
few hundred tokens longer than the cold prefill: on two simulators with LMCache at load 0.9, 8 of
34 narrowed decisions moved a session holding ~3,300 tokens to the other engine, holding 992; they
were the slowest requests (bench-results/lmcache, r10-flow). Counting that delay on every narrowed
decision, or on every last engine with room, cost the tail below capacity on four engines, where
the hit engines were saturated by a cold first turn's backlog, which the router accounts exactly
(bench-results/flow: ramp at 0.5x TTFT p90 1.18 s against 0.91 s).

An engine whose KV is full (it
would preempt), at its hard in-flight cap, or kept clear for a higher class is never chosen; nor
is one whose slot wait cannot be estimated yet (no request has finished).

Without the slot wait (only a backlog was weighed), a warm turn whose hit engine was merely full
went cold to an engine with room after waiting in the queue: ten times the prefill it was admitted
on (bench-results/flow: the slowest admitted requests at 1.5x, actual/predicted TTFT 1.9).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Option:
    """One engine for the request: its cached prefix of the prompt, its backlog and rate, and the
    wait for a batch slot there (0 with one free)."""

    hit_tokens: float
    backlog_tokens: float
    tokens_per_s: float
    slot_wait_s: float = 0.0
    # its LMCache loads' time beyond computing the tokens loaded: a session's prefix another engine
    # computed comes from the shared store there (Redis: ~5x computing it), which LMCache loads
    # synchronously, holding up that engine's other requests too
    load_s: float = 0.0

    def uncached(self, prompt_tokens: float) -> float:
        return max(0.0, prompt_tokens - self.hit_tokens)

    def ttft_s(self, prompt_tokens: float) -> float:
        """Expected time to the first token there: a slot, its backlog, then what it does not hold."""
        work_s = (self.backlog_tokens + self.uncached(prompt_tokens)) / self.tokens_per_s
        return self.slot_wait_s + work_s + self.load_s

    def cost_s(self, prompt_tokens: float) -> float:
        """What sending the request there costs: its first token there, and the delay its prefill
        and its LMCache loads (synchronous, in the engine's step) add to the next request there."""
        return self.ttft_s(prompt_tokens) + self.uncached(prompt_tokens) / self.tokens_per_s + self.load_s


def slot_wait_s(service_s: float, in_flight: int, waiting: float) -> float:
    """Expected wait for a batch slot at a full engine: ``waiting`` requests there and then this one,
    a slot freeing every ``service_s / in_flight`` seconds (``service_s``: a request's time at an
    engine)."""
    return (max(0.0, waiting) + 1.0) * service_s / max(1, in_flight)


def prefer_hit_engine(
    prompt_tokens: float, hit: Option, free: Option, waitable: bool, last_room: bool = False
) -> bool:
    """Send to the saturated ``hit`` engine instead of the best one with room (``free``): when its
    saturation is one a request can wait out there (``waitable``: a backlog, a full batch, a
    waiting queue), it holds more of the prompt, and its first token comes sooner there, or, with
    ``last_room`` (``free`` is the last engine with room and ``hit`` is queueing), sending it there
    costs less (:meth:`Option.cost_s`)."""
    if not waitable or hit.hit_tokens <= free.hit_tokens or hit.tokens_per_s <= 0 or free.tokens_per_s <= 0:
        return False
    if last_room:
        return hit.cost_s(prompt_tokens) < free.cost_s(prompt_tokens)
    return hit.ttft_s(prompt_tokens) < free.ttft_s(prompt_tokens)
