"""Header abuse: a client cannot make the router do work out of proportion to a request's size.

A 100 MB header used to cost quadratic time in the HTTP parser's buffers: the event loop starved,
health probes timed out, every engine was marked unhealthy and good clients got 502/503. Now the
request line and headers are capped in bytes and in count (431), checked on the socket before any
request work; other clients do not notice.
"""

from __future__ import annotations

import socket
import threading

import httpx
from tests.router.conftest import MODEL, Sim
from tests.security.conftest import EdgeFactory, GoodClient, parse_raw_response

from kvstack.common.waits import wait_until

HEAD = b"POST /v1/completions HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\n"


def _send_raw(port: int, payload: bytes, chunk: int = 1 << 16) -> bytes:
    """Send ``payload`` in pieces (the router may refuse and close mid-way), then read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            for start in range(0, len(payload), chunk):
                s.sendall(payload[start : start + chunk])
        except OSError:
            pass  # refused and closed before the whole header was sent: the answer is waiting
        data = b""
        try:
            while part := s.recv(65536):
                data += part
        except OSError:
            pass
        return data


def test_a_huge_header_gets_431_and_other_clients_do_not_notice(sims: list[Sim], edge: EdgeFactory) -> None:
    """While a client streams a 20 MB header, a well-behaved client's requests all succeed; the
    abuser gets a 431 in the OpenAI shape, and every engine stays available."""
    r = edge(engines=[s.url for s in sims], max_header_bytes=32 * 1024)
    bomb = HEAD + b"x-bomb: " + b"a" * (20 * 1024 * 1024) + b"\r\n\r\n"
    answers: list[bytes] = []
    with GoodClient(r.url) as good:
        wait_until(lambda: good.served(3), "the good client's first answers", timeout=30)
        abusers = [threading.Thread(target=lambda: answers.append(_send_raw(r.port, bomb))) for _ in range(3)]
        for t in abusers:
            t.start()
        for t in abusers:
            t.join(60)
        served = len(good.statuses)
        wait_until(lambda: good.served(served + 3), "the good client's answers after the abuse", timeout=30)
    assert len(answers) == 3
    for raw in answers:
        status, headers, body = parse_raw_response(raw)
        assert status == 431 and headers["connection"] == "close", raw[:300]
        assert httpx.Response(431, content=body).json()["error"]["code"] == 431
    now = r.ctx.clock()
    assert all(e.available(now) for e in r.ctx.registry.all())
    assert r.metric("kvstack_router_rejections_total", reason="header_too_large") == 3


def test_too_many_header_fields_get_431(sims: list[Sim], edge: EdgeFactory) -> None:
    """10,000 small headers (within the byte limit) are refused by count."""
    r = edge(engines=[sims[0].url], max_header_bytes=1024 * 1024, max_header_count=100)
    many = HEAD + b"".join(b"x-h%d: v\r\n" % i for i in range(10_000)) + b"content-length: 2\r\n\r\n{}"
    status, _, body = parse_raw_response(_send_raw(r.port, many))
    assert status == 431
    assert "header fields" in httpx.Response(431, content=body).json()["error"]["message"]


def test_headers_within_the_limits_are_served(sims: list[Sim], edge: EdgeFactory) -> None:
    """A request just under both limits is proxied as usual, on a keep-alive connection twice."""
    r = edge(engines=[sims[0].url], max_header_bytes=16 * 1024, max_header_count=50)
    headers = {f"x-h{i}": "v" * 200 for i in range(40)}  # ~9 KB in 40 fields
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    with httpx.Client(base_url=r.url, headers=headers) as client:
        assert client.post("/v1/completions", json=body).status_code == 200
        assert client.post("/v1/completions", json=body).status_code == 200
    too_big = {"x-big": "v" * (17 * 1024)}
    resp = httpx.post(f"{r.url}/v1/completions", json=body, headers=too_big)
    assert resp.status_code == 431 and resp.json()["error"]["type"] == "BadRequestError"


def test_a_request_that_is_not_http_gets_400_in_the_openai_shape(sims: list[Sim], edge: EdgeFactory) -> None:
    r = edge(engines=[sims[0].url])
    tls_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64
    for garbage in (tls_hello, b"GET / HTTP/1.1\r\nbad header\r\n\r\n"):
        status, headers, body = parse_raw_response(_send_raw(r.port, garbage))
        assert status == 400 and headers["connection"] == "close"
        assert httpx.Response(400, content=body).json()["error"]["type"] == "BadRequestError"
    assert r.metric("kvstack_router_rejections_total", reason="bad_request") == 2


def test_an_h2c_upgrade_offer(sims: list[Sim], edge: EdgeFactory) -> None:
    """curl --http2 on http:// offers `Upgrade: h2c`: a GET is served in HTTP/1.1; a POST gets a
    400 that says why (the HTTP parser stops at the offer, so its body would silently be lost)."""
    r = edge(engines=[sims[0].url])
    h2c = (
        b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
    )
    status, _, answer = parse_raw_response(
        _send_raw(r.port, b"GET /v1/models HTTP/1.1\r\nhost: r\r\n" + h2c + b"\r\n")
    )
    assert status == 200 and MODEL in answer.decode(), answer[:300]
    body = b'{"model": "%s", "prompt": "x", "max_tokens": 1}' % MODEL.encode()
    post = HEAD + h2c + b"content-length: %d\r\n\r\n%s" % (len(body), body)
    status, _, answer = parse_raw_response(_send_raw(r.port, post))
    assert status == 400 and "Upgrade" in httpx.Response(400, content=answer).json()["error"]["message"]
