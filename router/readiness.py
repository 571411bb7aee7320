"""When the router answers ``/ready`` 200: a pure decision on what it sees now.

A router is ready once an engine is available and the KV-event history of the available engines is
in its index. A fresh router replays each engine's event buffer (vLLM keeps 10,000 scheduler
steps): on engines with a long history that is seconds of the router's CPU, and a request routed
meanwhile is placed on a half-built index and shares the event loop with the replay
(bench-results/lmcache section 19). Behind a Service, a router rolled out while the old one still
serves then gets traffic only once it can route it well.

1. No engine is available: not ready (``no_engine``), as before any replay mattered; unless the
   caller asked with ``need_engine`` off (the chart's startup probe: a router in front of a model
   scaled to zero must come up and hold its requests, and with no engine nothing is replaying).
2. Ready once already: ready. An engine added or restarted later replays too, but every replica of
   the router sees it at once; pulling them all out of the Service for it would stop the traffic
   the replay is meant to serve better.
3. An available engine's history is still being replayed, and less than ``sync_timeout_s`` has
   passed since the router started: not ready (``syncing``). The bound keeps an engine whose replay
   hangs from keeping the router out forever; 0 turns the wait off (``ready``).
4. Otherwise ready: ``sync_timed_out``, rule 3's bound let it in.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

Reason = Literal["ready", "no_engine", "syncing", "sync_timed_out"]


class Readiness(NamedTuple):
    ready: bool
    reason: Reason

    @property
    def latches(self) -> bool:
        """Whether this answer makes the router ready for good (rule 2): a ready answer with an
        engine to be ready for. A startup probe's ``no_engine`` 200 does not: an engine added later
        must still have its history replayed before the router counts as ready."""
        return self.ready and self.reason != "no_engine"


def readiness(
    available: int,
    syncing: int,
    since_start_s: float,
    sync_timeout_s: float,
    was_ready: bool,
    need_engine: bool = True,
) -> Readiness:
    """Whether ``/ready`` answers 200: ``available`` engines, ``syncing`` of them still replaying."""
    if available <= 0:
        return Readiness(not need_engine, "no_engine")
    if was_ready or syncing <= 0 or sync_timeout_s <= 0:
        return Readiness(True, "ready")
    if since_start_s < sync_timeout_s:
        return Readiness(False, "syncing")
    return Readiness(True, "sync_timed_out")
