"""How the flow benchmark's client retries, as a real OpenAI-API client does. Pure.

The official ``openai`` SDK retries a request by default (``max_retries=2``) when the answer is
408, 409, 429 or 5xx, or no answer came; it waits the answer's ``Retry-After`` when that is more
than 0 and at most 60 s, and otherwise backs off exponentially: 0.5 s doubled per retry, at most
8 s, shortened by up to a quarter at random (jitter). This module states that behaviour for the
benchmark's client (:mod:`kvstack.bench.flow_driver`), in the *user's* seconds: on the simulated
cluster, simulated seconds (the router's header is in its wall seconds; the driver converts).

The 60 s cap is the SDK's: a longer Retry-After is not waited for (the user would give up on an
interactive answer long before), the backoff applies instead. The router never asks for more than
60 wall seconds (``router/flow/admission.MAX_RETRY_AFTER_S``).

A lost request (no answer, status 0) is not retried here: in the benchmark it is a connection
broken mid-stream or the client's timeout, and a retry would double work already done or counted.
"""

from __future__ import annotations

import math
from typing import Final

RETRYABLE: Final = frozenset({408, 409, 429})
MAX_RETRY_AFTER_S: Final = 60.0  # the SDK honours Retry-After up to this; above, it backs off
INITIAL_BACKOFF_S: Final = 0.5
MAX_BACKOFF_S: Final = 8.0


def retryable(status: int) -> bool:
    """Whether an answer with ``status`` is retried: 408, 409, 429 and every 5xx (as the SDK)."""
    return status in RETRYABLE or 500 <= status <= 599


def retry_after_s(header: str | None, header_ms: str | None = None) -> float | None:
    """The answer's delay in seconds, read as the SDK reads it: ``retry-after-ms`` (``header_ms``,
    milliseconds) first, then ``Retry-After`` (``header``, seconds); None when neither is a number
    (an HTTP date is not one the router sends)."""
    for value, divisor in ((header_ms, 1000.0), (header, 1.0)):
        if value is None:
            continue
        try:
            delay = float(value.strip()) / divisor
        except ValueError:
            continue
        if math.isfinite(delay):
            return delay
    return None


def retry_wait_s(retry_after: float | None, retries_done: int, jitter: float) -> float:
    """Seconds to wait before the next attempt, after ``retries_done`` retries already made.

    ``retry_after`` (the answer's Retry-After, in the same seconds) is waited when
    ``0 < retry_after <= 60``; otherwise ``min(0.5 * 2**retries_done, 8) * (1 - 0.25 * jitter)``
    with ``jitter`` in [0, 1) (the caller's random draw).
    """
    if retries_done < 0:
        raise ValueError(f"retries_done must be >= 0, got {retries_done}")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"jitter must be in [0, 1), got {jitter}")
    if retry_after is not None and 0.0 < retry_after <= MAX_RETRY_AFTER_S:
        return retry_after
    backoff = min(INITIAL_BACKOFF_S * 2.0 ** min(retries_done, 32), MAX_BACKOFF_S)
    return backoff * (1.0 - 0.25 * jitter)
