"""Request bodies held in memory are bounded for the whole router, not only per request.

20 concurrent 30 MB bodies (each under the 32 MiB per-request limit) took the router's RSS to
701 MB; about 60 would pass the chart's 2 GiB limit. Now all in-flight bodies together stay under
``max_buffered_body_bytes``: beyond it a request gets 503 with Retry-After, and the bytes are
given back when each request ends, whichever way it ends.
"""

from __future__ import annotations

import socket

import httpx
import pytest
from tests.router.conftest import MODEL, Sim
from tests.security.conftest import EdgeFactory, assert_openai_error

from kvstack.common.waits import wait_until
from kvstack.router.exchange import ClientGone, read_body
from kvstack.router.limits import BodyBudget

MIB = 1024 * 1024


def _start_upload(port: int, declared: int) -> socket.socket:
    """A client that declares ``declared`` bytes of body, sends a few, and waits."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n{" % declared
    )
    return s


def test_bodies_beyond_the_budget_get_503_and_the_budget_comes_back(
    sims: list[Sim], edge: EdgeFactory
) -> None:
    """Two uploads in progress hold the whole budget: a third client gets 503 + Retry-After in
    the OpenAI shape; when the uploads go away, the budget is whole again and requests pass."""
    r = edge(engines=[sims[0].url], max_body_bytes=MIB, max_buffered_body_bytes=2 * MIB, body_timeout_s=30.0)
    uploads = [_start_upload(r.port, MIB) for _ in range(2)]
    try:
        wait_until(lambda: r.ctx.bodies.held == 2 * MIB, "both uploads holding their bytes", timeout=10)
        resp = httpx.post(f"{r.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert_openai_error(resp, 503)
        assert r.metric("kvstack_router_rejections_total", reason="body_budget") == 1
    finally:
        for s in uploads:
            s.close()
    wait_until(lambda: r.ctx.bodies.held == 0, "the uploads' bytes given back", timeout=10)
    big = {"model": MODEL, "prompt": "x", "max_tokens": 1, "user": "y" * (MIB // 2)}
    assert httpx.post(f"{r.url}/v1/completions", json=big, timeout=30).status_code == 200
    assert r.ctx.bodies.held == 0


def _receiver(*messages: dict[str, object]):  # type: ignore[no-untyped-def]
    queue = list(messages)

    async def receive() -> dict[str, object]:
        return queue.pop(0)

    return receive


@pytest.mark.parametrize(
    ("declared", "chunks", "capacity", "outcome", "held_after"),
    [
        (None, [b"ab", b"cd"], 10, b"abcd", 4),  # chunked: taken as it arrives
        (4, [b"abcd"], 10, b"abcd", 4),  # declared: taken up front
        (8, [b"abcd"], 10, b"abcd", 4),  # shorter than declared: the rest given back
        (11, [b"x"], 10, 503, 0),  # declared over the budget: refused before reading
        (None, [b"12345", b"678901"], 10, 503, 0),  # chunked past the budget: all given back
        (None, [b"ab", "gone"], 10, ClientGone, 0),  # the client left mid-body
    ],
)
async def test_read_body_takes_and_gives_back(
    declared: int | None, chunks: list[bytes | str], capacity: int, outcome: object, held_after: int
) -> None:
    budget = BodyBudget(capacity)
    messages: list[dict[str, object]] = []
    for i, chunk in enumerate(chunks):
        if chunk == "gone":
            messages.append({"type": "http.disconnect"})
        else:
            messages.append({"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1})
    receive = _receiver(*messages)
    if isinstance(outcome, bytes):
        assert await read_body(receive, 100, declared, budget) == outcome
    elif outcome is ClientGone:
        with pytest.raises(ClientGone):
            await read_body(receive, 100, declared, budget)
    else:
        with pytest.raises(Exception) as err:
            await read_body(receive, 100, declared, budget)
        assert getattr(err.value, "status", None) == outcome and getattr(err.value, "retry_after", 0) >= 1
    assert budget.held == held_after


def test_an_oversized_body_is_a_413_declared_or_not(sims: list[Sim], edge: EdgeFactory) -> None:
    """Over max_body_bytes: 413 in the OpenAI shape whether Content-Length says so or the body is
    chunked; nothing stays held."""
    r = edge(engines=[sims[0].url], max_body_bytes=MIB)
    big = b'{"model": "%s", "prompt": "%s"}' % (MODEL.encode(), b"x" * (2 * MIB))
    assert_openai_error(httpx.post(f"{r.url}/v1/completions", content=big), 413)
    chunked = httpx.post(f"{r.url}/v1/completions", content=iter([big[:MIB], big[MIB:]]))
    assert_openai_error(chunked, 413)
    assert r.ctx.bodies.held == 0
