"""An engine's health from its ``/health`` probes: what one probe says, and the hysteresis. Pure.

The monitor (:mod:`kvstack.router.monitor`) does the probing; these rules decide what a probe
result means. No clock, no I/O: the caller passes ``now`` and the engine's last answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class ProbeTrack:
    """Probe history of one engine."""

    ok_streak: int = 0
    fail_streak: int = 0
    probes: int = 0


@dataclass(frozen=True, slots=True)
class ProbeVerdict:
    track: ProbeTrack
    healthy: bool


# ok: a 2xx answer in time; failed: no connection, a non-2xx answer, or no answer in time from an
# engine that is not answering requests either; busy: no answer in time from one that is
ProbeResult = Literal["ok", "failed", "busy"]


def probe_result(
    *, answered: bool, timed_out: bool, last_answer: float, now: float, window: float
) -> ProbeResult:
    """What one probe says: ``busy`` when it timed out and the engine answered one of our requests
    within ``window`` seconds (a probe interval and its timeout: since about the last probe)."""
    if answered:
        return "ok"
    if timed_out and last_answer > 0 and now - last_answer <= window:
        return "busy"
    return "failed"


def judge_probe(
    track: ProbeTrack,
    *,
    result: ProbeResult,
    healthy: bool,
    unhealthy_threshold: int,
    healthy_threshold: int,
) -> ProbeVerdict:
    """Fold one probe result into an engine's health.

    1. The first probe of an engine decides its health outright (nothing to smooth yet);
    2. later a healthy engine turns unhealthy after ``unhealthy_threshold`` failures in a row and
       back after ``healthy_threshold`` successes;
    3. a ``busy`` probe changes nothing, streaks included: an engine whose API server is too loaded
       to answer ``/health`` in time while it answers our requests is working, and marking it
       unhealthy would end every request it is serving and pile them onto the other engines (the
       cascade a load balancer's health check can start). A frozen engine answers nothing: its
       timeouts are failures once its last answer is older than the window.
    """
    ok_streak, fail_streak = track.ok_streak, track.fail_streak
    if result == "busy":
        return ProbeVerdict(ProbeTrack(ok_streak, fail_streak, track.probes + 1), healthy)
    ok = result == "ok"
    if ok:
        ok_streak, fail_streak = ok_streak + 1, 0
    else:
        ok_streak, fail_streak = 0, fail_streak + 1
    if track.probes == 0:
        healthy = ok
    elif healthy and fail_streak >= unhealthy_threshold:
        healthy = False
    elif not healthy and ok_streak >= healthy_threshold:
        healthy = True
    return ProbeVerdict(ProbeTrack(ok_streak, fail_streak, track.probes + 1), healthy)
