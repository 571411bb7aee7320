"""The router process's garbage-collector settings: a latency-sensitive server's, not a script's.

CPython's cyclic collector runs a young-generation pass every 700 container allocations by default.
On a busy router that is a pass every dozen requests, and each stalls everything the event loop is
doing (measured in the routing benchmark: 42 passes of 0.6 ms on average, up to 2.7 ms, over 528
requests: about 8% of requests, right where TTFT p90 is read). Almost everything the router
allocates is freed by reference counting, so young passes can be rare. What startup allocated
(imports, the app) is collected, then frozen: it lives for the whole process and no pass needs to
look at it again.

How rare is the catch. The young generation's count is allocations *minus deallocations* of
tracked objects: what reference counting frees never counts. So a threshold is not "a pass every N
allocations" but "a pass once N objects have survived", and on a router what survives is almost only
cyclic garbage (an HTTP client's response cycles, a cancelled task's frame and traceback), each
holding what it references (bodies, buffers, a 4K-token prompt's token lists). Found with
``gc.get_count()`` and a census of ``gc.garbage`` under ``DEBUG_SAVEALL`` (router/README.md,
"Memory over time"): at 50,000 the router held up to 50,000 garbage objects and everything they
referenced, RSS climbing 0.65 MB/s with real-size chats until a pass. The default, 7,000, keeps
young passes 10x rarer than Python's and garbage to a few MB; the older generations keep
Python's ratios.
"""

from __future__ import annotations

import gc


def tune_gc(gen0_threshold: int) -> None:
    """Collect and freeze what exists now, and run young passes once ``gen0_threshold`` objects have
    survived; 0: leave Python's defaults untouched."""
    if gen0_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
