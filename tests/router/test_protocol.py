"""Request parsing and SSE framing: pure functions, table-driven."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from kvstack.common.errors import OpenAIError
from kvstack.router.protocol import (
    Kind,
    SSEFramer,
    error_event,
    has_content,
    parse_request,
    split_done,
)


def enc(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("kind", "raw", "status", "param"),
    [
        ("chat", b"", 400, None),
        ("chat", b"{not json", 400, None),
        ("chat", b"[1, 2]", 400, None),
        ("chat", enc({"messages": CHAT["messages"]}), 400, "model"),
        ("chat", enc({**CHAT, "model": ""}), 400, "model"),
        ("chat", enc({**CHAT, "model": 3}), 400, "model"),
        ("chat", enc({"model": "m"}), 400, "messages"),
        ("chat", enc({"model": "m", "messages": []}), 400, "messages"),
        ("chat", enc({"model": "m", "messages": [{"content": "x"}]}), 400, "messages"),
        ("chat", enc({"model": "m", "messages": [{"role": "user", "content": 5}]}), 400, "messages"),
        # content parts: the router reads text parts, so a text part's text must be a string
        ("chat", enc({"model": "m", "messages": [{"role": "user", "content": ["hi"]}]}), 400, "messages"),
        (
            "chat",
            enc({"model": "m", "messages": [{"role": "user", "content": [{"text": "a"}]}]}),
            400,
            "messages",
        ),
        (
            "chat",
            enc({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
            400,
            "messages",
        ),
        (
            "chat",
            enc({"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}),
            400,
            "messages",
        ),
        ("chat", enc({**CHAT, "stream": "yes"}), 400, "stream"),
        ("chat", enc({**CHAT, "max_tokens": "10"}), 400, "max_tokens"),
        ("chat", enc({**CHAT, "max_tokens": -1}), 400, "max_tokens"),
        ("chat", enc({**CHAT, "max_tokens": True}), 400, "max_tokens"),
        ("chat", enc({**CHAT, "max_completion_tokens": 1.5}), 400, "max_completion_tokens"),
        ("chat", enc({**CHAT, "n": 0}), 400, "n"),
        ("chat", enc({**CHAT, "user": 7}), 400, "user"),
        ("completion", enc({"model": "m"}), 400, "prompt"),
        ("completion", enc({"model": "m", "prompt": 3}), 400, "prompt"),
        ("completion", enc({"model": "m", "prompt": []}), 400, "prompt"),
        ("completion", enc({"model": "m", "prompt": [1, "a"]}), 400, "prompt"),
        ("embedding", enc({"model": "m"}), 400, "input"),
        ("embedding", enc({"model": "m", "input": "x", "stream": True}), 400, "stream"),
        ("tokenize", enc({"model": "m"}), 400, "prompt"),
        ("detokenize", enc({"model": "m", "tokens": ["a"]}), 400, "tokens"),
    ],
)
def test_invalid_requests_are_400_naming_the_field(
    kind: Kind, raw: bytes, status: int, param: str | None
) -> None:
    with pytest.raises(OpenAIError) as info:
        parse_request(kind, raw)
    assert info.value.status == status
    assert info.value.param == param


@pytest.mark.parametrize(
    ("kind", "body", "stream", "max_tokens", "user"),
    [
        ("chat", CHAT, False, None, None),
        ("chat", {**CHAT, "stream": True, "max_tokens": 5, "user": "u"}, True, 5, "u"),
        ("chat", {**CHAT, "stream": None, "max_completion_tokens": 7, "max_tokens": 3}, False, 7, None),
        (
            "chat",
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
            False,
            None,
            None,
        ),
        ("completion", {"model": "m", "prompt": "hello", "max_tokens": 0}, False, 0, None),
        ("completion", {"model": "m", "prompt": [1, 2, 3]}, False, None, None),
        ("completion", {"model": "m", "prompt": [[1, 2], [3]]}, False, None, None),
        ("completion", {"model": "m", "prompt": ["a", "b"], "stream": True}, True, None, None),
        ("embedding", {"model": "m", "input": ["a"]}, False, None, None),
        ("tokenize", {"prompt": "no model is fine here"}, False, None, None),
        ("tokenize", {"model": "m", "messages": CHAT["messages"]}, False, None, None),
        ("detokenize", {"model": "m", "tokens": [1, 2]}, False, None, None),
    ],
)
def test_valid_requests_keep_the_body_and_expose_the_routers_fields(
    kind: Kind, body: dict[str, Any], stream: bool, max_tokens: int | None, user: str | None
) -> None:
    parsed = parse_request(kind, enc({**body, "unknown_field": {"kept": True}}))
    assert (parsed.stream, parsed.max_tokens, parsed.user) == (stream, max_tokens, user)
    assert parsed.model == body.get("model")
    assert parsed.body["unknown_field"] == {"kept": True}


def chunk(**delta: Any) -> bytes:
    return b"data: " + enc({"choices": [{"index": 0, "delta": delta}]}) + b"\n\n"


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        (chunk(role="assistant", content=""), False),
        (chunk(content="Hi"), True),
        (chunk(role="assistant", content="") + chunk(content="x"), True),
        (b"data: " + enc({"choices": [{"index": 0, "text": "a"}]}) + b"\n\n", True),
        (b"data: " + enc({"choices": [{"index": 0, "text": ""}]}) + b"\n\n", False),
        (chunk(reasoning_content="hmm"), True),
        (chunk(tool_calls=[{"id": "t"}]), True),
        (b"data: [DONE]\n\n", False),
        (b"data: {broken\n\n", False),
        (b": keep-alive comment\n\n", False),
        (b"data: " + enc({"choices": [], "usage": {"total_tokens": 3}}) + b"\n\n", False),
    ],
)
def test_has_content(events: bytes, expected: bool) -> None:
    assert has_content(events) is expected


@pytest.mark.parametrize(
    ("chunks", "forwarded"),
    [
        ([b"data: a\n\n", b"data: b\n\n"], [b"data: a\n\n", b"data: b\n\n"]),
        ([b"data: a\n\ndata: b", b"b\n\n"], [b"data: a\n\n", b"data: bb\n\n"]),
        ([b"data: ", b"x", b"\n\n"], [b"", b"", b"data: x\n\n"]),
        ([b"data: a\n", b"\ndata: b\n\n"], [b"", b"data: a\n\ndata: b\n\n"]),
    ],
)
def test_sse_framer_forwards_whole_frames_only(chunks: list[bytes], forwarded: list[bytes]) -> None:
    framer = SSEFramer()
    assert [framer.feed(c) for c in chunks] == forwarded
    assert framer.flush() == b""


def test_sse_framer_flushes_a_trailing_partial_frame_at_a_clean_end() -> None:
    framer = SSEFramer()
    assert framer.feed(b"data: a\n\ndata: tail") == b"data: a\n\n"
    assert framer.flush() == b"data: tail"


def test_error_event_is_an_openai_error_frame() -> None:
    frame = error_event(502, "boom")
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    body = msgspec.json.decode(frame[6:])
    assert body["error"]["code"] == 502 and body["error"]["message"] == "boom"


@pytest.mark.parametrize(
    ("frames", "kept", "done"),
    [
        (b"data: a\n\ndata: [DONE]\n\n", b"data: a\n\n", b"data: [DONE]\n\n"),
        (b"data: a\r\n\r\ndata: [DONE]\r\n\r\n", b"data: a\r\n\r\n", b"data: [DONE]\r\n\r\n"),
        (b"data:[DONE]\n\n", b"", b"data:[DONE]\n\n"),
        (b"data: [DONE]\n\ndata: a\n\n", b"data: [DONE]\n\ndata: a\n\n", b""),  # not the last
        (b"xdata: [DONE]\n\n", b"xdata: [DONE]\n\n", b""),  # not a line of its own
        (b"data: a\n\n", b"data: a\n\n", b""),
    ],
)
def test_split_done_takes_only_a_done_event_that_ends_the_frames(
    frames: bytes, kept: bytes, done: bytes
) -> None:
    assert split_done(frames) == (kept, done)
