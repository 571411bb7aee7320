"""The client's side of one proxied request: its body, its record, its error answer, its log line.

Everything here is independent of engines and policies: :mod:`kvstack.router.proxy` reads the body
with :func:`read_body`, fills an :class:`Exchange` as the request goes, ends a failed one with
:func:`settle_failure` (which answers with :func:`send_error`), and ends every one with
:func:`account` (metrics and the access log line).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from kvstack.common.errors import OpenAIError, error_body, is_openai_error, openai_error_bytes
from kvstack.router.auth import ANONYMOUS
from kvstack.router.limits import BodyBudget
from kvstack.router.logs import ACCESS_LOGGER
from kvstack.router.metrics import RouterMetrics

Receive = Any
Send = Any

access_log = logging.getLogger(ACCESS_LOGGER)

JSON_HEADERS = [(b"content-type", b"application/json")]


class ClientGone(Exception):
    """The client disconnected before its request body was read."""


class RetryLater(OpenAIError):
    """A 429 or 503 that tells the client when to come back (``Retry-After``)."""

    def __init__(self, status: int, message: str, retry_after: float) -> None:
        super().__init__(status, message)
        self.retry_after = retry_after


class EngineAnswer(OpenAIError):
    """An engine's own error answer, relayed as the last word (rewritten into the OpenAI shape)."""

    def __init__(self, status: int, message: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(status, message)
        self.answer = body if is_openai_error(body) else openai_error_bytes(status, body)
        self.headers = headers


@dataclass(slots=True)
class Exchange:
    """What happened to one request; becomes its log line and metric labels."""

    request_id: str
    start: float
    model: str = ""
    engine: str = ""
    status: int = 0
    attempts: int = 0
    stream: bool = False
    key: str = ANONYMOUS
    reason: str = ""
    error: str = ""
    ttft: float | None = None
    routed: float | None = None  # arrival to the engine request: the router's own share of the TTFT
    started: bool = False  # response headers sent: from here on nothing can be retried
    finished: bool = False
    disconnected: bool = False
    # flow control (router/flow/): the request's class and tenant, and its wait in the router's queue
    priority_class: str = ""
    tenant: str = ""
    queue_wait: float | None = None


async def read_body(receive: Receive, limit: int, declared: int | None, budget: BodyBudget) -> bytes:
    """The request body, refusing more than ``limit`` bytes (before reading, when declared).

    Its bytes are taken from ``budget`` (all of a declared length up front, else as they arrive);
    the caller gives back ``len(body)`` when the request ends. When the budget is spent: 503 with
    Retry-After, and whatever this body had taken is given back.
    """
    if declared is not None and declared > limit:
        raise OpenAIError(413, f"request body is larger than {limit} bytes")
    held = declared or 0
    if held and not budget.take(held):
        raise _budget_spent()
    parts: list[bytes] = []
    size = 0
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise OpenAIError(413, f"request body is larger than {limit} bytes")
            if size > held:  # no (or a wrong) declared length: hold what arrives
                if not budget.take(size - held):
                    raise _budget_spent()
                held = size
            parts.append(chunk)
            if not message.get("more_body", False):
                break
    except BaseException:
        budget.give(held)
        raise
    budget.give(held - size)  # a body shorter than declared (the server would have refused it)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _budget_spent() -> RetryLater:
    return RetryLater(503, "the router is holding too many request bodies; try again shortly", 1.0)


async def send_error(send: Send, err: OpenAIError) -> None:
    """Answer with ``err`` in the OpenAI error shape; a 429 or 503 always says when to come back
    (``Retry-After``: its own wait rounded up to whole seconds, else 1 s). A computed wait goes out
    exactly as ``retry-after-ms`` too, which the openai SDKs read before ``Retry-After``: under a
    TTFT objective of a second, whole seconds would spend the objective on the rounding."""
    headers = list(JSON_HEADERS)
    if isinstance(err, RetryLater):
        headers.append((b"retry-after", str(max(1, math.ceil(err.retry_after))).encode()))
        headers.append((b"retry-after-ms", str(max(1, round(err.retry_after * 1000))).encode()))
    elif isinstance(err, EngineAnswer):
        headers.extend(err.headers)  # the engine's own Retry-After among them, when it sent one
    if err.status in (429, 503) and not any(name == b"retry-after" for name, _ in headers):
        headers.append((b"retry-after", b"1"))
    if isinstance(err, EngineAnswer):
        body = err.answer
    else:
        body = msgspec.json.encode(error_body(err.status, err.message, param=err.param))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def settle_failure(send: Send, ex: Exchange, err: ClientGone | OpenAIError) -> None:
    """Record how a request failed on ``ex``: a client gone before its body was read is a 499 with
    no answer; an OpenAIError is its status, answered in the OpenAI shape unless the response has
    already started (then the client sees the stream end)."""
    if isinstance(err, ClientGone):
        ex.disconnected, ex.status = True, 499
        return
    ex.status, ex.error = err.status, err.message
    if not ex.started:
        await send_error(send, err)


async def watch_disconnect(receive: Receive, task: asyncio.Task[Any], ex: Exchange) -> None:
    """Cancel ``task`` when the client disconnects (the body was read, so only that can arrive)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not ex.finished:
                ex.disconnected = True
                task.cancel()
            return


def account(metrics: RouterMetrics, ex: Exchange, path: str, log_it: bool) -> None:
    """Count the finished request in the router's metrics and, when ``log_it``, log its line."""
    elapsed = time.perf_counter() - ex.start
    model = metrics.model_label(ex.model)  # the client's string: a label only if it is a real model
    # 0: the handler raised (a bug, answered 500) or was cancelled at shutdown (uvicorn answers 500)
    status = str(ex.status or 500)
    metrics.labelled(metrics.requests, model, ex.engine, status).inc()
    metrics.labelled(metrics.route_requests, path, status).inc()
    if ex.engine:
        metrics.labelled(metrics.e2e, model).observe(elapsed)
    if ex.ttft is not None:
        metrics.labelled(metrics.ttft, model).observe(ex.ttft)
    if ex.disconnected:
        metrics.disconnects.labels(model).inc()
    if log_it:
        access_log.info(
            "request",
            extra={
                "request_id": ex.request_id,
                "path": path,
                "model": ex.model,
                "engine": ex.engine,
                "status": ex.status,
                "attempts": ex.attempts,
                "route_reason": ex.reason,
                "stream": ex.stream,
                "key": ex.key,
                "duration_ms": round(elapsed * 1000, 3),
                "ttft_ms": None if ex.ttft is None else round(ex.ttft * 1000, 3),
                "route_ms": None if ex.routed is None else round(ex.routed * 1000, 3),
                "error": ex.error or None,
                "priority_class": ex.priority_class or None,
                "tenant": ex.tenant or None,
                "queue_wait_ms": None if ex.queue_wait is None else round(ex.queue_wait * 1000, 3),
            },
        )
