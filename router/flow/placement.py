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

The request goes to the hit engine when that is expected to cost less: its expected first token
plus the delay its own prefill adds to the next request at that engine (its uncached tokens at the
engine's rate, :meth:`Option.cost_s`). Going cold puts the prefill of everything the hit engine
holds back on the cluster: the requests queued behind it on the cold engine wait for it, and the
session's history is now held twice. Weighing only this request's first token (until 2026-12-05)
sent a warm turn cold whenever the hit engine's backlog was a few hundred tokens longer than the
cold prefill: on two simulators with LMCache at load 0.9, 8 of 34 narrowed decisions moved a
session holding ~3,300 tokens to an idle engine holding 992; those were the slowest requests (TTFT
p90 1.25 s against 0.61 s with flow control off; bench-results/lmcache, r10-flow).

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

    def uncached(self, prompt_tokens: float) -> float:
        return max(0.0, prompt_tokens - self.hit_tokens)

    def ttft_s(self, prompt_tokens: float) -> float:
        """Expected time to the first token there: a slot, its backlog, then what it does not hold."""
        return self.slot_wait_s + (self.backlog_tokens + self.uncached(prompt_tokens)) / self.tokens_per_s

    def cost_s(self, prompt_tokens: float) -> float:
        """What sending the request there costs: its first token there, and the delay its prefill
        adds to the next request at that engine."""
        return self.ttft_s(prompt_tokens) + self.uncached(prompt_tokens) / self.tokens_per_s


def slot_wait_s(service_s: float, in_flight: int, waiting: float) -> float:
    """Expected wait for a batch slot at a full engine: ``waiting`` requests there and then this one,
    a slot freeing every ``service_s / in_flight`` seconds (``service_s``: a request's time at an
    engine)."""
    return (max(0.0, waiting) + 1.0) * service_s / max(1, in_flight)


def prefer_hit_engine(prompt_tokens: float, hit: Option, free: Option, waitable: bool) -> bool:
    """Send to the saturated ``hit`` engine instead of the best one with room (``free``): when its
    saturation is one a request can wait out there (``waitable``: a backlog, a full batch, a
    waiting queue), it holds more of the prompt, and sending it there costs less (:meth:`Option.cost_s`)."""
    if not waitable or hit.hit_tokens <= free.hit_tokens or hit.tokens_per_s <= 0 or free.tokens_per_s <= 0:
        return False
    return hit.cost_s(prompt_tokens) < free.cost_s(prompt_tokens)
