"""Whether an engine can take one more request now, from its own signals. Pure.

An engine is *saturated* (the request waits in the router instead of in the engine's FCFS queue)
when the first of these holds, checked in this order:

1. ``idle`` never: with nothing of this router's in flight there, it takes one (so the queue always
   drains: each engine keeps at least one request, whatever stale or foreign load it reports);
2. ``in_flight_cap``: the router's own in-flight count reached ``max_in_flight_per_engine`` (an
   optional hard ceiling; off by default);
3. ``waiting``: the engine's scraped waiting queue is longer than ``max_waiting`` (0: any request
   waiting there means it is out of batch slots or KV, so one more only waits longer there);
4. ``kv_usage``: its scraped KV-cache usage reached ``max_kv_usage`` (vLLM preempts beyond it);
5. ``prefill_backlog``: the uncached prompt tokens the router sent it and not yet seen prefilled
   would take more than ``prefill_target_s`` at its prefill rate. This is the signal that needs no
   scrape: it reacts to a burst at once, where the scraped queue lags by a scrape interval.

Otherwise it has ``room``. The prefill rate is the engines' measured one: the configured default
comes from the H200 reference run (tests/reference), and each engine's own is learnt from the TTFTs
it delivers (:func:`learn_rate`), so a slower or faster engine gets its own threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Reason = Literal["idle", "room", "in_flight_cap", "waiting", "kv_usage", "prefill_backlog"]
REASONS: tuple[Reason, ...] = ("idle", "room", "in_flight_cap", "waiting", "kv_usage", "prefill_backlog")


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One engine as the saturation rule sees it."""

    in_flight: int  # the router's own requests there
    prefill_tokens: float  # uncached prompt tokens the router sent there, not yet prefilled
    prefill_tokens_per_s: float  # its measured (or default) prefill rate
    num_waiting: float | None = None  # scraped; None: unknown or stale
    kv_usage: float | None = None  # scraped, 0..1


@dataclass(frozen=True, slots=True)
class Limits:
    prefill_target_s: float
    max_kv_usage: float = 0.95
    max_waiting: int = 0
    max_in_flight: int | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    saturated: bool
    reason: Reason


def saturation(load: EngineLoad, limits: Limits) -> Verdict:
    """The rule of the module docstring."""
    if load.in_flight <= 0:
        return Verdict(False, "idle")
    if limits.max_in_flight is not None and load.in_flight >= limits.max_in_flight:
        return Verdict(True, "in_flight_cap")
    if load.num_waiting is not None and load.num_waiting > limits.max_waiting:
        return Verdict(True, "waiting")
    if load.kv_usage is not None and load.kv_usage >= limits.max_kv_usage:
        return Verdict(True, "kv_usage")
    if load.prefill_tokens >= load.prefill_tokens_per_s * limits.prefill_target_s:
        return Verdict(True, "prefill_backlog")
    return Verdict(False, "room")


MIN_SAMPLE_S = 0.005  # a TTFT shorter than this says nothing about the prefill rate


def learn_rate(current: float, default: float, tokens: float, ttft_s: float, weight: float) -> float:
    """The engine's prefill rate after one observed TTFT (an EWMA of ``weight``).

    ``tokens`` is what the engine had to prefill before this request's first token: the router's
    backlog there when it was sent plus its own uncached tokens. A sample is clipped to a quarter
    to four times ``default``, so one stalled or lucky request cannot swing the threshold, and too
    small a sample (a full cache hit, a tiny prompt) leaves the rate as it is.
    """
    if weight <= 0 or tokens <= 0 or ttft_s < MIN_SAMPLE_S:
        return current
    sample = min(4 * default, max(default / 4, tokens / ttft_s))
    return (1 - weight) * current + weight * sample
