"""Outlier detection: which engines stop getting requests, and for how long (Envoy's rules).

The proxy reports every finished try on an engine to :func:`judge_outcome`: a failure is a
connection failure, an answer of 500 or more, a timeout, a response that broke off or an engine
declared down meanwhile; any other answer is a success. Per engine:

1. an outcome that arrives while the engine is ejected (a request sent before) changes nothing
   (``while_ejected``);
2. outcomes are counted in windows of ``interval_s`` (one starts with the first outcome after the
   last one closed); each window that closed without a failure decrements the engine's ejection
   count (the multiplier below), as Envoy does;
3. ``consecutive_failures`` failures in a row eject the engine (``consecutive``, Envoy's
   ``consecutive_5xx``);
4. else, a window holding at least ``min_requests`` outcomes of which at least ``failure_rate``
   failed ejects it (``failure_rate``, Envoy's ``failure_percentage``): an engine that fails one
   request in two never fails three in a row for long, yet is just as bad;
5. an ejection that would leave more than ``max_ejected_percent`` of the engines ejected is not
   made (``over_cap``; one engine may always be ejected): a fault every engine shares, or a client
   that makes every engine fail, must not take the whole model down;
6. an ejection lasts ``base_ejection_s`` times the engine's ejection count, at most
   ``max_ejection_s``; only that time ends it (health probes do not: an engine that answers
   ``/health`` may fail every request);
7. back from an ejection, the engine keeps its failure streak: its first failure ejects it again, for
   longer; a success clears the streak.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

OutcomeReason = Literal["success", "failure", "consecutive", "failure_rate", "over_cap", "while_ejected"]


@dataclass(frozen=True, slots=True)
class OutlierRules:
    """The thresholds (built from the router's ``eject_*`` settings)."""

    consecutive_failures: int = 3
    failure_rate: float = 0.5
    min_requests: int = 10
    interval_s: float = 10.0
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0
    max_ejected_percent: float = 50.0

    def allowed_ejected(self, engines: int) -> int:
        """How many of ``engines`` may be ejected at once (at least one)."""
        return max(1, int(engines * self.max_ejected_percent / 100.0))


@dataclass(frozen=True, slots=True)
class OutlierTrack:
    """One engine's outcome history, as far as ejection needs it."""

    consecutive: int = 0  # failures in a row
    window_start: float = 0.0
    requests: int = 0  # outcomes in the current window
    failures: int = 0  # failures among them
    ejections: int = 0  # the ejection-time multiplier
    ejected_until: float = 0.0  # monotonic time; 0: never ejected


@dataclass(frozen=True, slots=True)
class OutlierVerdict:
    track: OutlierTrack
    reason: OutcomeReason
    ejected_for: float = 0.0  # seconds, when this outcome ejected the engine

    @property
    def ejected(self) -> bool:
        return self.reason in ("consecutive", "failure_rate")


def judge_outcome(
    track: OutlierTrack, *, failed: bool, now: float, ejected_others: int, engines: int, rules: OutlierRules
) -> OutlierVerdict:
    """Fold one outcome into ``track``; ``ejected_others`` of ``engines`` are ejected right now."""
    if track.ejected_until > now:
        return OutlierVerdict(track, "while_ejected")
    if now - track.window_start >= rules.interval_s:
        closed = int((now - track.window_start) // rules.interval_s)  # the current one, and empty ones
        clean = closed if track.failures == 0 else closed - 1
        track = replace(
            track, window_start=now, requests=0, failures=0, ejections=max(0, track.ejections - clean)
        )
    if not failed:  # every answered request comes here: built directly, replace() costs 3x more
        t = track
        t = OutlierTrack(0, t.window_start, t.requests + 1, t.failures, t.ejections, t.ejected_until)
        return OutlierVerdict(t, "success")
    track = replace(
        track, consecutive=track.consecutive + 1, requests=track.requests + 1, failures=track.failures + 1
    )
    reason: OutcomeReason
    if track.consecutive >= rules.consecutive_failures:
        reason = "consecutive"
    elif track.requests >= rules.min_requests and track.failures >= rules.failure_rate * track.requests:
        reason = "failure_rate"
    else:
        return OutlierVerdict(track, "failure")
    if ejected_others + 1 > rules.allowed_ejected(engines):
        return OutlierVerdict(track, "over_cap")
    ejections = track.ejections + 1
    duration = min(rules.base_ejection_s * ejections, rules.max_ejection_s)
    until = now + duration
    # the next window starts when the engine is back: what it did before says nothing more
    track = replace(
        track, ejections=ejections, ejected_until=until, window_start=until, requests=0, failures=0
    )
    return OutlierVerdict(track, reason, duration)
