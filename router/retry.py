"""When a failed try of a request is tried again, and on which engines: pure, no I/O, no clock.

The proxy describes each failed try as an :class:`AttemptFailure` and asks :func:`next_step`:

1. bytes of the answer already reached the client: stop (``sent``); a stream ends with an error
   event, nothing can be taken back;
2. the engine did not answer within the first-byte timeout: stop (``timeout``); it is alive and may
   still be working on the request, and a second engine would likely be as slow; the answer was
   over the router's size cap: stop (``too_large``), another engine would answer the same;
3. the engine answered a status that says nothing about another engine (say 501): stop
   (``status``) and relay it;
4. the request had its ``max_attempts`` tries: stop (``attempts``);
5. no available engine of the model is left untried: stop (``no_engine``);
6. otherwise try again (``retry``) on one of :func:`untried`, chosen by the routing policy.

Retried, while nothing was sent: connection failures, answers 500/502/503/504, a response that broke
off, and an engine the router declared down while the request waited on it (``engine_lost``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

from kvstack.router.engines import EngineState

FailureKind = Literal["connect", "timeout", "read", "too_large", "status", "engine_lost"]
RetryReason = Literal["retry", "sent", "timeout", "too_large", "status", "attempts", "no_engine"]

RETRIED_STATUSES = frozenset({500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class AttemptFailure:
    """One try that failed on one engine, and what the client gets if it is the last word."""

    kind: FailureKind
    status: int  # the client's status: the engine's own for ``status``, else 502 or 504
    message: str
    sent: bool = False  # part of the answer (a stream's head) already went to the client
    answer: bytes | None = None  # the engine's own error body (``status``), relayed when it stops

    @property
    def label(self) -> str:
        """The failure as a metric label: the kind, or the status for engine answers."""
        return str(self.status) if self.kind == "status" else self.kind


@dataclass(frozen=True, slots=True)
class RetryVerdict:
    retry: bool
    reason: RetryReason


def next_step(failure: AttemptFailure, *, attempts: int, max_attempts: int, untried: int) -> RetryVerdict:
    """Whether to try again after ``failure``, the ``attempts``-th try; ``untried`` engines are left."""
    if failure.sent:
        return RetryVerdict(False, "sent")
    if failure.kind in ("timeout", "too_large"):
        return RetryVerdict(False, failure.kind)
    if failure.kind == "status" and failure.status not in RETRIED_STATUSES:
        return RetryVerdict(False, "status")
    if attempts >= max_attempts:
        return RetryVerdict(False, "attempts")
    if untried <= 0:
        return RetryVerdict(False, "no_engine")
    return RetryVerdict(True, "retry")


def untried(candidates: Sequence[EngineState], tried: Collection[str]) -> list[EngineState]:
    """The candidates (available engines of the model) whose URL is not among ``tried``."""
    return [e for e in candidates if e.url not in tried]
