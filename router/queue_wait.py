"""How long an engine's requests wait in its own queue before it schedules them, from its scrapes.

vLLM times each request's wait from arrival to its first scheduling
(``vllm:request_queue_time_seconds``, a histogram whose ``_sum`` and ``_count`` only grow). Between
two scrapes, the growth of the sum over the growth of the count is the mean wait of the requests it
first scheduled in between: what a request sent there now can expect to wait, whatever it waits
for (a batch slot, KV blocks, the token budget behind other prompts).

Why the router needs the engine's word for it: two LMCache engines on an H100 past saturation
(bench-results/lmcache section 18) kept ~25 sessions on one engine whose KV could not hold them;
its requests waited 1.5-4 s for blocks while the cost model, which counts only prefill queued
ahead, priced them at 0.1-0.5 s, and flow control learnt that wait as a prefill rate of ~800
tokens/s, then priced the idle engine beside it at that rate (11-16 s for a new session).

Pure: the previous and the new counters in, seconds out.
"""

from __future__ import annotations

from collections.abc import Mapping

# the counters' short names as router/scrape.py keeps them (no ``vllm:`` prefix)
QUEUE_SUM = "request_queue_time_seconds_sum"
QUEUE_COUNT = "request_queue_time_seconds_count"


def queue_wait_s(
    before: Mapping[str, float], after: Mapping[str, float], waiting: float | None, last: float
) -> float:
    """The engine's current queue wait after a scrape with counters ``after`` (``before``: the
    previous scrape's; ``last``: the wait found then; ``waiting``: requests waiting there now).

    * the engine scheduled requests since the previous scrape: their mean wait;
    * it scheduled none: ``last`` while requests still wait there (they have waited at least that
      long, and nothing says the queue moved), else 0 (nothing waits);
    * no counters (an engine that does not export them), the first scrape, or counters that went
      back (the engine restarted): 0 with nothing waiting, else ``last``.
    """
    sum_after, count_after = after.get(QUEUE_SUM), after.get(QUEUE_COUNT)
    sum_before, count_before = before.get(QUEUE_SUM), before.get(QUEUE_COUNT)
    still_waiting = last if waiting else 0.0
    if sum_after is None or count_after is None or sum_before is None or count_before is None:
        return still_waiting
    scheduled = count_after - count_before
    waited = sum_after - sum_before
    if scheduled < 0 or waited < 0:
        return still_waiting
    if scheduled == 0:
        return still_waiting
    return waited / scheduled
