"""Open-loop pacing for the benchmarks' load processes: requests leave at a fixed rate, whatever the
server does with them.

Request ``i`` is due at ``start + i / rate``, for every due time before ``until`` (:func:`send_times`,
pure). :func:`open_loop` sleeps until each one is due and starts it as its own task without waiting
for earlier answers; when the loop falls behind (a slow event loop, a long GC), the overdue requests
go at once, with no sleep, until it is on schedule again, so the rate over the phase holds instead of
drifting below ``rate``. It returns when every request it started has finished.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any


def send_times(rate: float, start: float, until: float) -> Iterator[float]:
    """When each request is due: ``start``, then every ``1 / rate`` seconds, while before ``until``."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    interval, i = 1.0 / rate, 0
    while (due := start + i * interval) < until:
        yield due
        i += 1


async def open_loop(
    rate: float,
    start: float,
    until: float,
    send: Callable[[int], Coroutine[Any, Any, None]],
    after_send: Callable[[], None] | None = None,
) -> int:
    """Start ``send(i)`` at each of :func:`send_times` (times on ``time.perf_counter``'s clock),
    then call ``after_send``; wait for every one started; return how many were sent."""
    tasks: set[asyncio.Task[None]] = set()  # held here: the loop keeps only weak references
    sent = 0
    for i, due in enumerate(send_times(rate, start, until)):
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(send(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        sent += 1
        if after_send is not None:
            after_send()
    await asyncio.gather(*tasks)
    return sent
