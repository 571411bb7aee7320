"""The router process's garbage-collector settings: a latency-sensitive server's, not a script's.

CPython's cyclic collector runs a young-generation pass every 700 container allocations by default.
On a busy router that is a pass every dozen requests, and each stalls everything the event loop is
doing (measured in the routing benchmark: 42 passes of 0.6 ms on average, up to 2.7 ms, over 528
requests: about 8% of requests, right where TTFT p90 is read). Almost everything the router
allocates is freed by reference counting, so passes can be rare. What startup allocated (imports,
the app) is frozen first: it lives for the whole process and no pass needs to look at it again.
"""

from __future__ import annotations

import gc


def tune_gc(gen0_threshold: int) -> None:
    """Freeze what exists now and run young passes every ``gen0_threshold`` allocations; 0: leave
    Python's defaults untouched."""
    if gen0_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
