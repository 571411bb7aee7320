"""The router process's garbage-collector settings: a latency-sensitive server's, not a script's.

CPython's cyclic collector runs a young-generation pass every 700 container allocations by default.
On a busy router that is a pass every dozen requests, and each stalls everything the event loop is
doing (measured in the routing benchmark: 42 passes of 0.6 ms on average, up to 2.7 ms, over 528
requests: about 8% of requests, right where TTFT p90 is read). Almost everything the router
allocates is freed by reference counting, so young passes can be rare. What startup allocated
(imports, the app) is collected, then frozen: it lives for the whole process and no pass needs to
look at it again.

The older generations must not become rarer with it. Python collects the middle generation every
10 young passes and the oldest every 10 middle ones: with young passes 70x rarer, cyclic garbage
that lived through one pass (a cancelled task's frame and traceback, a client's response cycle,
holding a 4K-token prompt's body and token lists) waited 100 young passes, 5M allocations, for a
full pass. Measured on the engine-tokenizer path with real-size chats (router/README.md, "Memory
over time"): RSS climbed 0.65 MB/s under load and 11.6 MB/min idle, and levelled only minutes later.
So each older generation is collected every second pass of the one below it (``threshold`` 1): a
full pass every four young ones at most, fewer as the heap grows (CPython runs a full pass only when
the objects new to the oldest generation are a quarter of it), and garbage lives no longer than
under Python's defaults.
"""

from __future__ import annotations

import gc

OLDER_THRESHOLD = 1  # each older generation: collected every second pass of the one below


def tune_gc(gen0_threshold: int) -> None:
    """Collect and freeze what exists now; run young passes every ``gen0_threshold`` allocations and
    each older generation every second pass of the younger; 0: leave Python's defaults untouched."""
    if gen0_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(gen0_threshold, OLDER_THRESHOLD, OLDER_THRESHOLD)
