"""Bad input is refused with a 4xx in the OpenAI error shape, never a 5xx, and the router goes on.

tests/router/test_proxy_faults.py covers the basic cases (broken JSON, a missing model or messages,
wrong ``stream``/``max_tokens`` types, an unknown model, oversized bodies); this file covers every
field the router reads, every proxied route, and hostile shapes (deep nesting, non-objects, NaN).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
from tests.router.conftest import MODEL, RouterServer, Sim, router_factory

M = MODEL.encode()
DEEP = 100_000


def chat(extra: bytes) -> bytes:
    return b'{"model": "%s", "messages": [{"role": "user", "content": "x"}]%s}' % (M, extra)


CASES = [
    # the body as a whole
    ("/v1/chat/completions", b"", None),
    ("/v1/chat/completions", b"[]", None),
    ("/v1/chat/completions", b'"a string"', None),
    ("/v1/chat/completions", b"null", None),
    ("/v1/chat/completions", b"\xff\xfe{}", None),
    ("/v1/chat/completions", b'{"model": NaN}', None),
    ("/v1/chat/completions", chat(b", }"), None),
    pytest.param(
        "/v1/chat/completions",
        b"[" * DEEP + b"]" * DEEP,
        None,
    ),
    pytest.param(
        "/v1/chat/completions",
        chat(b', "extra": ' + b"[" * DEEP + b"]" * DEEP),
        None,
    ),
    pytest.param(
        "/v1/chat/completions",
        chat(b', "extra": ' + b'{"a":' * DEEP + b"1" + b"}" * DEEP),
        None,
    ),
    # model
    ("/v1/chat/completions", b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', "model"),
    ("/v1/chat/completions", b'{"model": "", "messages": [{"role": "user", "content": "x"}]}', "model"),
    ("/v1/chat/completions", b'{"model": ["m"], "messages": [{"role": "user", "content": "x"}]}', "model"),
    ("/v1/chat/completions", b'{"model": null, "messages": [{"role": "user", "content": "x"}]}', "model"),
    ("/v1/completions", b'{"model": {"a": 1}, "prompt": "x"}', "model"),
    # messages
    ("/v1/chat/completions", b'{"model": "%s", "messages": "hi"}' % M, "messages"),
    ("/v1/chat/completions", b'{"model": "%s", "messages": []}' % M, "messages"),
    ("/v1/chat/completions", b'{"model": "%s", "messages": [1]}' % M, "messages"),
    ("/v1/chat/completions", b'{"model": "%s", "messages": [{"content": "x"}]}' % M, "messages"),
    ("/v1/chat/completions", b'{"model": "%s", "messages": [{"role": 1}]}' % M, "messages"),
    (
        "/v1/chat/completions",
        b'{"model": "%s", "messages": [{"role": "user", "content": 5}]}' % M,
        "messages",
    ),
    # the other fields the router reads
    ("/v1/chat/completions", chat(b', "stream": "yes"'), "stream"),
    ("/v1/chat/completions", chat(b', "stream": 1'), "stream"),
    ("/v1/chat/completions", chat(b', "max_tokens": -1'), "max_tokens"),
    ("/v1/chat/completions", chat(b', "max_tokens": true'), "max_tokens"),
    ("/v1/chat/completions", chat(b', "max_tokens": 1.5'), "max_tokens"),
    ("/v1/chat/completions", chat(b', "max_tokens": 1e400'), None),  # out of JSON range
    ("/v1/chat/completions", chat(b', "max_completion_tokens": "3"'), "max_completion_tokens"),
    ("/v1/chat/completions", chat(b', "n": 0'), "n"),
    ("/v1/chat/completions", chat(b', "n": "2"'), "n"),
    ("/v1/chat/completions", chat(b', "user": 5'), "user"),
    # prompts of the other routes
    ("/v1/completions", b'{"model": "%s"}' % M, "prompt"),
    ("/v1/completions", b'{"model": "%s", "prompt": 5}' % M, "prompt"),
    ("/v1/completions", b'{"model": "%s", "prompt": []}' % M, "prompt"),
    ("/v1/completions", b'{"model": "%s", "prompt": [1.5]}' % M, "prompt"),
    ("/v1/completions", b'{"model": "%s", "prompt": [[]]}' % M, "prompt"),
    ("/v1/completions", b'{"model": "%s", "prompt": ["a", 1]}' % M, "prompt"),
    ("/v1/completions", b'{"model": "%s", "prompt": [true]}' % M, "prompt"),
    ("/v1/embeddings", b'{"model": "%s"}' % M, "input"),
    ("/v1/embeddings", b'{"model": "%s", "input": {"a": 1}}' % M, "input"),
    ("/v1/embeddings", b'{"model": "%s", "input": "x", "stream": true}' % M, "stream"),
    ("/tokenize", b'{"model": "%s"}' % M, "prompt"),
    ("/tokenize", b'{"model": "%s", "messages": "x"}' % M, "messages"),
    ("/detokenize", b'{"model": "%s"}' % M, "tokens"),
    ("/detokenize", b'{"model": "%s", "tokens": "abc"}' % M, "tokens"),
    ("/detokenize", b'{"model": "%s", "tokens": [1.5]}' % M, "tokens"),
]


@pytest.fixture(scope="module")
def server(sims: list[Sim]) -> Iterator[RouterServer]:
    with router_factory(RouterServer) as make:
        yield make(engines=[sims[0].url])


@pytest.mark.parametrize(("path", "content", "param"), CASES)
def test_bad_request_is_a_400_naming_the_field(
    server: RouterServer, path: str, content: bytes, param: str | None
) -> None:
    """The client gets a 400 whose OpenAI error names the offending field; the router serves on."""
    resp = httpx.post(
        f"{server.url}{path}", content=content, headers={"content-type": "application/json"}, timeout=30
    )
    assert resp.status_code == 400, resp.text[:300]
    error = resp.json()["error"]
    assert error["code"] == 400 and error["type"] == "BadRequestError"
    assert error["param"] == param
    assert len(error["message"]) < 1000  # never the whole hostile body echoed back
    good = httpx.post(
        f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 1}, timeout=30
    )
    assert good.status_code == 200


@pytest.mark.parametrize(
    "value",
    [b"x" * 500, "é".encode(), b"a\tb", b""],
    ids=["overlong", "non-ascii", "tab", "empty"],
)
def test_an_unusable_request_id_is_replaced(server: RouterServer, value: bytes) -> None:
    """A request id that could poison logs or upstream headers is replaced by the router's own."""
    resp = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": MODEL, "prompt": "id", "max_tokens": 1},
        headers=[(b"x-request-id", value)],
    )
    assert resp.status_code == 200
    rid = resp.headers["x-request-id"]
    assert rid.encode() != value and 0 < len(rid) <= 128 and rid.isascii() and rid.isprintable()


def test_a_malformed_content_length_is_refused(server: RouterServer) -> None:
    """A Content-Length that is not a number is refused with a 400 before any body is read."""
    body = b'{"model": "m", "prompt": "x"}'
    head = b"POST /v1/completions HTTP/1.1\r\nhost: r\r\ncontent-length: 12abc\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head + body)
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
