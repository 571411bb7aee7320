"""Whether an engine can take one more request now, from its own signals. Pure.

An engine is *saturated* (the request waits in the router instead of in the engine's FCFS queue)
when the first of these holds, checked in this order:

0. ``reserved``: it is kept clear for a higher class (:func:`reserved_engines`, below);
1. ``idle`` never: with nothing of this router's in flight there, it takes one (so the queue always
   drains: each engine keeps at least one request, whatever stale or foreign load it reports);
2. ``in_flight_cap``: the router's own in-flight count reached ``max_in_flight_per_engine`` (an
   optional hard ceiling; off by default);
3. ``full``: the router's in-flight count there reached the engine's learnt batch capacity (the
   number it was running when a scrape last found requests waiting: :func:`learn_slots`);
4. ``overdue``: a stream this router sent there is past due (its expected prefill plus
   ``prefill_target_s``) without a first token: the engine is queueing, seen without a scrape;
5. ``waiting``: the engine's waiting queue (its last scrape, less this router's requests that ended
   there since: each freed a slot a waiting request took) is longer than ``max_waiting`` (0: any request
   waiting there means it is out of batch slots or KV, so one more only waits longer there), and
   this router's own requests confirm it: a stream sent there is past due (its expected prefill plus
   ``prefill_target_s``) without a first token, or no stream is there to tell. Below saturation a
   scrape often catches a request that arrived between two engine steps; one whose streams all get
   their first tokens on time is not queueing, whatever the scrape caught;
6. ``kv_usage``: its scraped KV-cache usage reached ``max_kv_usage`` (vLLM preempts beyond it);
7. ``prefill_backlog``: the uncached prompt tokens the router sent it and not yet seen prefilled
   would take more than ``prefill_target_s`` at its prefill rate. This is the signal that needs no
   scrape: it reacts to a burst at once, where the scraped queue lags by a scrape interval.

Otherwise it has ``room``.

**Engines that time-slice one GPU** (their engines-file or pod ``device``): a stream past due at one
of them (``overdue``, with its KV to spare, so it waits for compute, not for KV, and late by less
than a stream stuck on a hung engine would be) says the GPU itself is behind. An idle engine there
is then ``device_busy`` (:func:`device_busy`): rule 1's idle engine keeps the queue draining on a
GPU of its own, but on a shared one the busy engines drain it, and a request sent to the idle one
only takes a slice of the same compute. Without this, an idle engine the cache-aware estimate never
chose (waking it slows the busy ones) kept the model "with room", and flow control admitted
everything: four LMCache engines on one H200 at twice their capacity, 0 % refused and TTFT p50 5.9
s, the fourth engine idle throughout (bench-results/flow, "Four LMCache engines on an H200").
Engines there with work and room keep it: holding them too cut the simulators' goodput at 2x
(bench-results/flow, same section).

**Headroom for higher classes**: a request of a class below the highest class seen lately may fill
only ``share`` of an engine's learnt batch capacity (rule 3) and of its prefill target (rule 7)
(:func:`class_share`), so a request of the higher class finds room when it arrives instead of
queueing behind the lower class's work inside the engine. Rule 1 holds for every class (each engine
keeps one request of any class: the lower class always progresses), and with no higher class seen
within the window the share is 1 (work-conserving).

**Engines kept clear for higher classes** (rule 0): a share of one engine's prefill target bounds
nothing when one request of the lower class is longer than the target (a cold 3,000-word turn is
~1 s of prefill against a 0.5 s target, and rule 1 lets it in anyway), and an engine's FCFS queue
puts a higher-class request behind every prefill already there. So while a higher class was seen
within the window, the lower classes together may have prefill outstanding on at most
``floor(share x engines)`` (at least one) of the model's engines; the others are ``reserved``: no
lower-class request goes there, even when idle, so a higher-class request finds an engine with no
prefill ahead of it. The lower class keeps its engines (it always progresses), and with no higher
class about nothing is reserved (work-conserving).

The prefill rate is the engines' measured one: the configured default comes from the H200 reference
run (tests/reference), and each engine's own is learnt from the TTFTs it delivers
(:func:`rate_sample`, :func:`learn_rate`), so a slower or faster engine gets its own threshold (down
to a few hundred tokens/s: engines sharing a GPU prefill several times slower than the default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

Reason = Literal[
    "reserved",
    "idle",
    "room",
    "in_flight_cap",
    "full",
    "overdue",
    "waiting",
    "kv_usage",
    "prefill_backlog",
    "device_busy",
]
REASONS: tuple[Reason, ...] = get_args(Reason)


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One engine as the saturation rule sees it."""

    in_flight: int  # the router's own requests there
    prefill_tokens: float  # uncached prompt tokens the router sent there, not yet prefilled
    prefill_tokens_per_s: float  # its measured (or default) prefill rate
    num_waiting: float | None = None  # scraped, less ours ended since; None: unknown or stale
    kv_usage: float | None = None  # scraped, 0..1
    # this router's streams there: one past due without a first token (True), all on time (False),
    # none there (None)
    queueing: bool | None = None
    slots: float | None = None  # its learnt batch capacity (requests it runs at once); None: not yet
    reserved: bool = False  # kept clear of this request's (lower) class: :func:`reserved_engines`


@dataclass(frozen=True, slots=True)
class Limits:
    prefill_target_s: float
    max_kv_usage: float = 0.95
    max_waiting: int = 0
    max_in_flight: int | None = None
    share: float = 1.0  # of the batch capacity and prefill target this request's class may fill


def class_share(priority: int, top_active: int | None, lower_share: float) -> float:
    """The share of an engine a request of ``priority`` may fill: all of it when no class above it
    was seen lately (``top_active``: the highest priority seen within the window), else ``lower_share``."""
    return 1.0 if top_active is None or priority >= top_active else lower_share


def reserved_engines(held: Sequence[bool], share: float) -> list[bool]:
    """Which engines a lower class must leave clear for a higher one seen lately (rule 0).

    ``held[i]``: the lower classes have prefill outstanding on engine ``i``. They may hold at most
    ``floor(share x engines)`` engines (at least one); once they hold that many, every engine they
    do not hold is reserved. ``share`` 1 (no higher class about) reserves nothing."""
    allowed = max(1, math.floor(share * len(held) + 1e-9))
    if share >= 1.0 or sum(held) < allowed:
        return [False] * len(held)
    return [not h for h in held]


@dataclass(frozen=True, slots=True)
class Verdict:
    saturated: bool
    reason: Reason


def saturation(load: EngineLoad, limits: Limits) -> Verdict:
    """The rule of the module docstring."""
    if load.reserved:
        return Verdict(True, "reserved")
    if load.in_flight <= 0:
        return Verdict(False, "idle")
    if limits.max_in_flight is not None and load.in_flight >= limits.max_in_flight:
        return Verdict(True, "in_flight_cap")
    if load.slots is not None and load.in_flight >= load.slots * limits.share + limits.max_waiting:
        return Verdict(True, "full")
    if load.queueing:
        return Verdict(True, "overdue")
    if load.num_waiting is not None and load.num_waiting > limits.max_waiting and load.queueing is not False:
        return Verdict(True, "waiting")
    if load.kv_usage is not None and load.kv_usage >= limits.max_kv_usage:
        return Verdict(True, "kv_usage")
    if load.prefill_tokens >= load.prefill_tokens_per_s * limits.prefill_target_s * limits.share:
        return Verdict(True, "prefill_backlog")
    return Verdict(False, "room")


def device_busy(
    verdicts: Sequence[Verdict], devices: Sequence[str | None], late: Sequence[bool]
) -> list[Verdict]:
    """``verdicts`` with every idle engine on a GPU that is behind made ``device_busy``.

    ``devices[i]``: the device engine ``i`` shares (None: one of its own); ``late[i]``: a stream
    there is past due, lately (one late for longer is stuck on its engine, and must not keep the
    engine's neighbours idle), with its KV to spare (:func:`kv_to_spare`). A device is behind when
    one of its engines is ``overdue`` and late (the module docstring)."""
    behind = {
        device
        for verdict, device, is_late in zip(verdicts, devices, late, strict=True)
        if device is not None and is_late and verdict.reason == "overdue"
    }
    if not behind:
        return list(verdicts)
    return [
        Verdict(True, "device_busy") if device in behind and verdict.reason == "idle" else verdict
        for verdict, device in zip(verdicts, devices, strict=True)
    ]


KV_BOUND = 0.9  # KV usage from which requests waiting in an engine are waiting for KV


def kv_to_spare(kv_usage: float | None) -> bool:
    """Whether an engine's KV is known to have room (scraped and under :data:`KV_BOUND`): requests
    waiting there wait a step for its token budget (chunked prefill), not for KV or a slot."""
    return kv_usage is not None and kv_usage < KV_BOUND


def learn_slots(
    slots: float | None, running: float | None, waiting: float | None, kv_usage: float | None = None
) -> float | None:
    """The engine's batch capacity after a fresh scrape: what it runs while requests wait there
    (slots or KV are out), raised past what it ran without a queue (KV freed up, or never full).

    With its KV usage scraped and below :data:`KV_BOUND`, a waiting request is not a full batch: it
    waits a step for the step's token budget (another prompt's chunked prefill takes it), which says
    nothing about how many requests the engine runs, so nothing is learnt from it (rule 5 still
    holds such an engine while our streams there are late)."""
    if running is None or waiting is None:
        return slots
    if waiting > 0 and kv_to_spare(kv_usage):
        return slots
    if waiting > 0:
        return max(1.0, running)
    if slots is not None and running >= slots:
        return running + 1
    return slots


def waits_for_slot(
    in_flight: int, slots: float | None, waiting: float | None, kv_usage: float | None
) -> bool:
    """Whether a request just sent to an engine (counted in ``in_flight``) waits there for a batch
    slot: more in flight than its learnt batch capacity, or requests already waiting there for KV
    (its usage unknown or at :data:`KV_BOUND`; under it they wait a step for its token budget, which
    is prefill). Its first token then times that wait, not the engine's prefill: learnt from, such
    TTFTs pulled an H100 engine's rate from 11,692 to 1,221 tokens/s within 8 s of overload, and
    every warm turn then waited for its full hit engine rather than prefill on the idle one beside it
    (bench-results/lmcache section 15)."""
    if slots is not None and in_flight > slots:
        return True
    return bool(waiting) and not kv_to_spare(kv_usage)


MIN_SAMPLE_S = 0.005  # a TTFT shorter than this says nothing about the prefill rate
# a sample of fewer tokens than this (a full hit, a short uncached tail) is timed by the engine's step
# (a busy batch's decode step, tens of ms), not by its prefill: it would drag the rate down
MIN_SAMPLE_TOKENS = 1_024
# ... and one whose prefill took less than this, measured or expected at the rate learnt so far: the
# step time is a large part of it
MIN_SAMPLE_WORK_S = 0.25
# the learnt rate's floor: a safety bound, not a prior. Four engines sharing an H200 prefill ~5K
# tokens/s each (the calibrated simulators), a quarter of the 34K default: the learner must get there
MIN_PREFILL_TOKENS_PER_S = 250.0


# a run of this many samples, every one beyond FAR_OFF times the rate the same way: the rate is wrong
# (a prior for another GPU), not the engine's mood: the rate jumps to their median
RUN_SAMPLES = 3
FAR_OFF = 2.0


def rate_sample(current: float, default: float, tokens: float, ttft_s: float) -> float | None:
    """The prefill rate one observed TTFT shows, or None when it shows nothing.

    ``tokens`` is what the engine had to prefill before this request's first token: the router's
    backlog there when it was sent plus its own uncached tokens. Only a sample with enough work
    counts: at least :data:`MIN_SAMPLE_TOKENS`, and a TTFT or an expected prefill (at ``current``)
    of at least :data:`MIN_SAMPLE_WORK_S`. It is clipped to between :data:`MIN_PREFILL_TOKENS_PER_S`
    and four times ``default``: the rate may follow a slow engine all the way down (a floor of a
    quarter of the default kept a shared-GPU engine's rate at 8,500 tokens/s against its ~5,000, so
    its every cold turn looked overdue).
    """
    if tokens < MIN_SAMPLE_TOKENS or ttft_s < MIN_SAMPLE_S:
        return None
    if max(ttft_s, tokens / current) < MIN_SAMPLE_WORK_S:
        return None
    return min(4 * default, max(MIN_PREFILL_TOKENS_PER_S, tokens / ttft_s))


def learn_rate(current: float, samples: Sequence[float], weight: float) -> float:
    """The engine's prefill rate after its newest sample (``samples``: its latest, newest last).

    An EWMA of ``weight`` (a tenth by default: one stalled request moves it a tenth of the way),
    except after a run of :data:`RUN_SAMPLES` samples all more than :data:`FAR_OFF` times off the
    same way: then the rate is their median. A prior for another GPU (34K tokens/s against a shared
    GPU's ~5K) would otherwise take ~25 cold turns per engine to unlearn, while every one of them
    looked overdue; one or two outliers never make such a run. ``weight`` 0: never learn.
    """
    if weight <= 0 or not samples:
        return current
    run = list(samples)[-RUN_SAMPLES:]
    if len(run) == RUN_SAMPLES and (max(run) < current / FAR_OFF or min(run) > current * FAR_OFF):
        return max(MIN_PREFILL_TOKENS_PER_S, sorted(run)[RUN_SAMPLES // 2])
    return max(MIN_PREFILL_TOKENS_PER_S, (1 - weight) * current + weight * samples[-1])
