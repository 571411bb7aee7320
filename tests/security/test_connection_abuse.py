"""Connection abuse: idle sockets, slowloris headers and connection floods are bounded.

Before the guards, 250 idle connections and 250 trickling a header line every 10 s were all still
open after 90 s. Now a connection with no request is closed after ``client_idle_timeout_s``, a
header block slower than ``header_timeout_s`` gets a 408, and beyond ``max_client_connections``
a new connection gets a 503 with Retry-After.
"""

from __future__ import annotations

import contextlib
import socket
import threading

import httpx
from tests.router.conftest import MODEL, Sim
from tests.security.conftest import EdgeFactory, GoodClient, parse_raw_response

from kvstack.common.waits import wait_until

PORTION = b"POST /v1/completions HTTP/1.1\r\nhost: r\r\n"


def _closed_by_router(s: socket.socket) -> bytes | None:
    """What the router sent before closing ``s`` (b"" for a silent close); None if still open."""
    s.setblocking(False)
    data = b""
    try:
        while True:
            part = s.recv(65536)
            if not part:
                return data
            data += part
    except BlockingIOError:
        return None
    except OSError:
        return data


def test_idle_and_slow_header_connections_are_closed(sims: list[Sim], edge: EdgeFactory) -> None:
    """30 idle connections are closed silently, 30 slowloris ones get a 408 in the OpenAI shape;
    meanwhile a well-behaved client is served every time."""
    r = edge(engines=[sims[0].url], client_idle_timeout_s=1.0, header_timeout_s=1.5)
    idle = [socket.create_connection(("127.0.0.1", r.port)) for _ in range(30)]
    slow = [socket.create_connection(("127.0.0.1", r.port)) for _ in range(30)]
    stop = threading.Event()

    def trickle() -> None:  # one header line every 0.3 s on every slow connection, forever
        for s in slow:
            s.sendall(PORTION)
        while not stop.wait(0.3):
            for s in slow:
                with contextlib.suppress(OSError):
                    s.sendall(b"x-slow: 1\r\n")

    trickler = threading.Thread(target=trickle, daemon=True)
    try:
        with GoodClient(r.url) as good:
            trickler.start()
            answers = wait_until(
                lambda: (lambda got: got if all(a is not None for a in got) else None)(
                    [_closed_by_router(s) for s in idle + slow]
                ),
                "the router closing every idle and slow connection",
                timeout=30,
                interval=0.2,
            )
            served = len(good.statuses)
            wait_until(lambda: good.served(served + 2), "the good client's answers", timeout=30)
    finally:
        stop.set()
        trickler.join(5)
        for s in idle + slow:
            s.close()
    assert all(a == b"" for a in answers[:30]), answers[:30]
    for raw in answers[30:]:
        status, headers, body = parse_raw_response(raw)
        assert status == 408 and headers["connection"] == "close"
        assert httpx.Response(408, content=body).json()["error"]["type"] == "RequestTimeoutError"
    assert r.metric("kvstack_router_rejections_total", reason="header_timeout") == 30


def test_beyond_the_connection_cap_a_new_connection_gets_503(sims: list[Sim], edge: EdgeFactory) -> None:
    """With the cap reached, a new client reads a 503 with Retry-After (not a reset or a hang);
    once connections close, it is served again."""
    r = edge(engines=[sims[0].url], max_client_connections=10, client_idle_timeout_s=60.0)
    held = [socket.create_connection(("127.0.0.1", r.port)) for _ in range(10)]
    try:
        wait_until(lambda: len(r.server.server_state.connections) == 10, "10 open connections", timeout=10)
        resp = httpx.post(f"{r.url}/v1/completions", json={"model": "m", "prompt": "x"}, timeout=10)
        assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
        assert resp.headers["connection"] == "close"
        assert "open connections" in resp.json()["error"]["message"]
        assert r.metric("kvstack_router_rejections_total", reason="connection_limit") == 1
    finally:
        for s in held:
            s.close()
    wait_until(lambda: not r.server.server_state.connections, "the held connections to close", timeout=10)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    assert httpx.post(f"{r.url}/v1/completions", json=body, timeout=30).status_code == 200
