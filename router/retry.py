"""When a failed try of a request is tried again, and on which engines: pure, no I/O, no clock.

The proxy describes each failed try as an :class:`AttemptFailure` and asks :func:`next_step`:

1. bytes of the answer already reached the client: stop (``sent``); a stream ends with an error
   event, nothing can be taken back;
2. the engine did not answer within the first-byte timeout: stop (``timeout``); it is alive and may
   still be working on the request, and a second engine would likely be as slow; the answer was
   over the router's size cap: stop (``too_large``), another engine would answer the same;
3. the engine answered a status that says nothing about another engine (say 501): stop
   (``status``) and relay it;
4. the engine said it does not serve the model (``model_gone``: an adapter unloaded there, see
   :mod:`kvstack.router.model_gone`) and no try is left here (tries spent or no engine untried),
   but the router holds the model: wait for an engine to serve it again (``hold``);
5. the request had its ``max_attempts`` tries: stop (``attempts``);
6. no engine of the model it may go to is left untried: stop (``no_engine``);
7. otherwise try again (``retry``) on one of those (:func:`kvstack.router.engines.routable`, the
   tried ones left out), chosen by the routing policy.

Retried, while nothing was sent: connection failures, answers 500/502/503/504, a response that broke
off, an engine the router declared down while the request waited on it (``engine_lost``), and an
engine that no longer serves the model (``model_gone``, its 404).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FailureKind = Literal["connect", "timeout", "read", "too_large", "status", "engine_lost", "model_gone"]
RetryReason = Literal["retry", "sent", "timeout", "too_large", "status", "hold", "attempts", "no_engine"]

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


def next_step(
    failure: AttemptFailure, *, attempts: int, max_attempts: int, untried: int, held: bool = False
) -> RetryVerdict:
    """Whether to try again after ``failure``, the ``attempts``-th try; ``untried`` engines are left;
    ``held``: the router holds the request's model while no engine serves it."""
    if failure.sent:
        return RetryVerdict(False, "sent")
    if failure.kind in ("timeout", "too_large"):
        return RetryVerdict(False, failure.kind)
    if failure.kind == "status" and failure.status not in RETRIED_STATUSES:
        return RetryVerdict(False, "status")
    spent = attempts >= max_attempts or untried <= 0
    if failure.kind == "model_gone" and held and spent:
        return RetryVerdict(False, "hold")
    if attempts >= max_attempts:
        return RetryVerdict(False, "attempts")
    if untried <= 0:
        return RetryVerdict(False, "no_engine")
    return RetryVerdict(True, "retry")
