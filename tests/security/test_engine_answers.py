"""What an engine's answer can do to the router, and what the router tells clients about engines.

An engine's response used to be buffered without a cap (a 200 MB SSE event cost +406 MB and 37 s),
its Retry-After on a 429 was dropped, and a 502 named the engine's URL. Now a response or one SSE
event larger than ``max_response_bytes`` ends in a clean 502 (or an error event in a stream already
started), a 429/503 always carries Retry-After, and errors name no engine address.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
from tests.router.conftest import MODEL
from tests.security.conftest import COMPLETION, EdgeFactory, ScriptedEngine, assert_openai_error, reply

MIB = 1024 * 1024
BODY = {"model": MODEL, "prompt": "x", "max_tokens": 1}


def _huge_json(_m: str, _p: str, _h: dict[str, str], _b: bytes) -> bytes:
    return reply(200, b'{"x":"' + b"a" * (3 * MIB) + b'"}')


def _huge_event(
    _m: str, _p: str, _h: dict[str, str], _b: bytes
) -> Callable[[asyncio.StreamWriter], Awaitable[None]]:
    async def write(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        writer.write(b'data: {"choices":[{"index":0,"text":"x"}]}\n\n')
        for _ in range(48):  # one 3 MB event in 64 KB pieces, never ended
            writer.write(b"data: " + b"a" * 65536)
            await writer.drain()
        await asyncio.sleep(5)

    return write


def test_an_oversized_response_is_a_clean_502(edge: EdgeFactory) -> None:
    """A 3 MB JSON answer over a 1 MB cap: the client gets a 502 in the OpenAI shape."""
    with ScriptedEngine(_huge_json) as engine:
        r = edge(engines=[engine.url], max_response_bytes=MIB)
        error = assert_openai_error(httpx.post(f"{r.url}/v1/completions", json=BODY, timeout=30), 502)
        assert "larger than" in error["message"]


def test_an_oversized_stream_event_ends_the_stream_with_an_error_event(edge: EdgeFactory) -> None:
    """The stream's first event arrives; the oversized one is replaced by an error event and the
    stream ends, without waiting for the engine."""
    with ScriptedEngine(_huge_event) as engine:
        r = edge(engines=[engine.url], max_response_bytes=MIB)
        with httpx.stream(
            "POST", f"{r.url}/v1/completions", json={**BODY, "stream": True}, timeout=30
        ) as resp:
            assert resp.status_code == 200
            text = b"".join(resp.iter_bytes())
    first, error = text.split(b"\n\n")[:2]
    assert b'"text":"x"' in first
    assert error.startswith(b"data: ") and b'"code":502' in error and b"larger than" in error
    assert len(text) < 4096


def test_an_engine_429_keeps_its_retry_after(edge: EdgeFactory) -> None:
    def busy(_m: str, _p: str, _h: dict[str, str], _b: bytes) -> bytes:
        return reply(
            429, b'{"error":{"message":"busy","type":"RateLimitError","code":429}}', ("retry-after", "7")
        )

    with ScriptedEngine(busy) as engine:
        r = edge(engines=[engine.url])
        resp = httpx.post(f"{r.url}/v1/completions", json=BODY, timeout=30)
    assert resp.status_code == 429 and resp.headers["retry-after"] == "7"


def test_an_engine_503_without_retry_after_gets_one(edge: EdgeFactory) -> None:
    def down(_m: str, _p: str, _h: dict[str, str], _b: bytes) -> bytes:
        return reply(503, b'{"error":{"message":"down","type":"X","code":503}}')

    with ScriptedEngine(down) as engine:
        r = edge(engines=[engine.url], eject_after_failures=10)
        resp = httpx.post(f"{r.url}/v1/completions", json=BODY, timeout=30)
    # the engine's own error (already in the OpenAI shape) is relayed as its last word, with a wait
    assert resp.status_code == 503 and resp.json()["error"]["message"] == "down"
    assert int(resp.headers["retry-after"]) >= 1


def test_a_502_names_no_engine_address(edge: EdgeFactory) -> None:
    """An engine that drops every request: the client learns that, not where the engine lives."""

    def hang_up(
        _m: str, _p: str, _h: dict[str, str], _b: bytes
    ) -> Callable[[asyncio.StreamWriter], Awaitable[None]]:
        async def close(writer: asyncio.StreamWriter) -> None:
            writer.close()

        return close

    with ScriptedEngine(hang_up) as engine:
        r = edge(engines=[engine.url], max_attempts=1, eject_after_failures=10)
        resp = httpx.post(f"{r.url}/v1/completions", json=BODY, timeout=30)
    error = assert_openai_error(resp, 502)
    assert "127.0.0.1" not in resp.text and str(engine.port) not in resp.text, error


def test_hop_by_hop_cookies_and_forwarded_for(edge: EdgeFactory) -> None:
    """The engine never sees Cookie or a header the client named in Connection; X-Forwarded-For
    is the client's claim with the address the router saw appended."""
    with ScriptedEngine(lambda *_: reply(200, COMPLETION)) as engine:
        r = edge(engines=[engine.url])
        headers = {
            "connection": "keep-alive, x-hop",
            "x-hop": "secret",
            "cookie": "session=abc",
            "x-forwarded-for": "203.0.113.9",
            "x-kept": "yes",
        }
        assert (
            httpx.post(f"{r.url}/v1/completions", json=BODY, headers=headers, timeout=30).status_code == 200
        )
        seen = engine.post_headers[-1]
    assert "x-hop" not in seen and "cookie" not in seen
    assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert seen["x-kept"] == "yes"


def test_two_authorization_headers_are_refused(edge: EdgeFactory) -> None:
    with ScriptedEngine(lambda *_: reply(200, COMPLETION)) as engine:
        r = edge(engines=[engine.url], api_keys=["sk-a", "sk-b"])
        auth = [("authorization", "Bearer sk-a"), ("authorization", "Bearer sk-b")]
        error = assert_openai_error(httpx.post(f"{r.url}/v1/completions", json=BODY, headers=auth), 400)
        assert "Authorization" in error["message"] and not engine.post_headers


def test_a_trailing_slash_is_not_redirected_from_the_host_header(edge: EdgeFactory) -> None:
    """No 307 whose Location a client's Host header chose: a plain 404 in the OpenAI shape."""
    with ScriptedEngine(lambda *_: reply(200, COMPLETION)) as engine:
        r = edge(engines=[engine.url])
        resp = httpx.post(f"{r.url}/v1/chat/completions/", json=BODY, headers={"host": "evil.example"})
        assert_openai_error(resp, 404)
        assert "location" not in resp.headers


def test_models_not_yet_learnt_answer_503_not_404(edge: EdgeFactory) -> None:
    """A router that has not yet learnt an engine's models (it just started) says come back
    shortly; only once every engine's models are known is an unknown model a 404."""
    with ScriptedEngine(lambda *_: reply(200, COMPLETION), models_hang=True) as engine:
        r = edge(engines=[engine.url], available=0)
        assert_openai_error(httpx.post(f"{r.url}/v1/completions", json=BODY, timeout=30), 503)
    with ScriptedEngine(lambda *_: reply(200, COMPLETION)) as engine:
        r = edge(engines=[engine.url])
        assert httpx.post(f"{r.url}/v1/completions", json=BODY, timeout=30).status_code == 200
        unknown = httpx.post(f"{r.url}/v1/completions", json={**BODY, "model": "nope"}, timeout=30)
        assert_openai_error(unknown, 404)
