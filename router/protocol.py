"""OpenAI request parsing the router needs, and SSE frame handling (prompts: :mod:`.prompts`).

The body is decoded once (msgspec; the audio routes' multipart form is scanned for its fields) and
forwarded as the original bytes: the router validates only the fields it reads (model, the prompt or
the route's inputs, stream, max_tokens, n, user) and leaves the rest to the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from kvstack.common import multipart
from kvstack.common.errors import OpenAIError, error_body
from kvstack.common.prompt_messages import (
    anthropic_messages,
    check_anthropic_messages,
    check_responses_input,
    responses_messages,
)
from kvstack.router.prompts import PROMPT_FIELD, check_prompt, token_ids
from kvstack.router.upstream import UpstreamError

Kind = Literal[
    "chat",
    "completion",
    "embedding",
    "tokenize",
    "detokenize",
    "responses",
    "messages",
    "rerank",
    "score",
    "classify",
    "pooling",
    "audio",
]
# kinds whose answer may be an SSE stream (``stream: true``)
STREAMING: frozenset[Kind] = frozenset({"chat", "completion", "responses", "messages", "audio"})
# kinds whose body is multipart/form-data, not JSON
MULTIPART: frozenset[Kind] = frozenset({"audio"})
# the pairs of fields a score request may compare (vLLM 0.24 accepts each of these forms)
SCORE_PAIRS = (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"), ("data_1", "data_2"))
_FORM_TRUE = frozenset({"true", "1", "yes", "on"})
_FORM_FALSE = frozenset({"false", "0", "no", "off", ""})

_decode_json = msgspec.json.Decoder().decode


@dataclass(slots=True)
class ParsedRequest:
    """The fields the router acts on; ``body`` is the decoded JSON object, never re-encoded."""

    kind: Kind
    model: str | None
    body: dict[str, Any]
    stream: bool = False
    max_tokens: int | None = None
    user: str | None = None
    # the prompt as chat messages: a chat's, a tokenize request's, or a response's input as messages
    messages: list[dict[str, Any]] | None = None


def decode_body(raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw``; 400 for anything else."""
    if not raw:
        raise OpenAIError(400, "request body is empty; expected a JSON object")
    try:
        body = _decode_json(raw)
    except msgspec.DecodeError as err:
        raise OpenAIError(400, f"request body is not valid JSON: {err}") from err
    except RecursionError as err:  # msgspec past its nesting limit
        raise OpenAIError(400, "request body is not valid JSON: nested too deeply") from err
    if not isinstance(body, dict):
        raise OpenAIError(400, f"request body must be a JSON object, not {type(body).__name__}")
    return body


def _opt_int(body: dict[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OpenAIError(400, f"'{name}' must be an integer >= {minimum}", param=name)
    return value


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "'messages' must be a non-empty array", param="messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise OpenAIError(
                400, f"'messages[{i}]' must be an object with a string 'role'", param="messages"
            )
        content = msg.get("content")
        if content is not None and not isinstance(content, str | list):
            raise OpenAIError(400, f"'messages[{i}].content' must be a string or an array", param="messages")
        if isinstance(content, list):
            _check_content_parts(content, i)


def _check_content_parts(parts: list[Any], i: int) -> None:
    # Text parts are what the router reads (prompt text, tokens); other part types pass through.
    for j, part in enumerate(parts):
        where = f"messages[{i}].content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise OpenAIError(400, f"'{where}' must be an object with a string 'type'", param="messages")
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise OpenAIError(400, f"'{where}.text' must be a string", param="messages")


def parse_request(kind: Kind, raw: bytes, content_type: str | None = None) -> ParsedRequest:
    """Decode and validate the router's fields of one request; raises 400 ``OpenAIError``.

    ``content_type`` is the request's Content-Type, read only for the multipart (audio) routes.
    """
    if kind in MULTIPART:
        return _parse_form(kind, raw, content_type)
    body = decode_body(raw)
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise OpenAIError(400, "'model' must be a non-empty string", param="model")
    if model is None and kind not in ("tokenize", "detokenize"):
        raise OpenAIError(400, "'model' is required", param="model")
    messages = _check_inputs(kind, body)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise OpenAIError(400, "'stream' must be a boolean", param="stream")
    if kind == "embedding" and stream:
        raise OpenAIError(400, "embeddings cannot be streamed", param="stream")
    max_tokens = _opt_int(body, "max_tokens", 0)
    max_completion = _opt_int(body, "max_completion_tokens", 0)
    if kind == "responses":
        max_tokens, max_completion = None, _opt_int(body, "max_output_tokens", 1)
    _opt_int(body, "n", 1)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise OpenAIError(400, "'user' must be a string", param="user")
    return ParsedRequest(
        kind=kind,
        model=model,
        body=body,
        stream=stream and kind in STREAMING,
        max_tokens=max_completion if max_completion is not None else max_tokens,
        user=user,
        messages=messages,
    )


def _check_inputs(kind: Kind, body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Check the fields that carry the request's input; the prompt as messages when it is a chat."""
    if kind == "chat":
        _check_messages(body.get("messages"))
        return body["messages"]  # type: ignore[no-any-return]
    if kind in ("completion", "embedding"):
        field = PROMPT_FIELD[kind]
        if field not in body:
            raise OpenAIError(400, f"'{field}' is required", param=field)
        check_prompt(body[field], field)
    elif kind == "tokenize":
        if "messages" in body:
            _check_messages(body["messages"])
            return body["messages"]  # type: ignore[no-any-return]
        if "prompt" not in body:
            raise OpenAIError(400, "'prompt' or 'messages' is required", param="prompt")
        check_prompt(body["prompt"], "prompt")
    elif kind == "detokenize" and token_ids(body.get("tokens"), "tokens") is None:
        raise OpenAIError(400, "'tokens' must be an array of token ids", param="tokens")
    elif kind == "responses":
        if "input" not in body:
            raise OpenAIError(400, "'input' is required", param="input")
        check_responses_input(body["input"])
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise OpenAIError(400, "'instructions' must be a string", param="instructions")
        return responses_messages(body["input"], instructions)
    elif kind == "messages":  # Anthropic's Messages API
        check_anthropic_messages(body.get("messages"), body.get("system"))
        if _opt_int(body, "max_tokens", 1) is None:
            raise OpenAIError(400, "'max_tokens' is required", param="max_tokens")
        return anthropic_messages(body["messages"], body.get("system"))
    elif kind == "rerank":
        _check_rerank(body)
    elif kind == "score":
        if not any(a in body and b in body for a, b in SCORE_PAIRS):
            raise OpenAIError(400, "'text_1' and 'text_2' are required", param="text_1")
    elif kind in ("classify", "pooling"):
        if "input" not in body and "messages" not in body:
            raise OpenAIError(400, "'input' or 'messages' is required", param="input")
        if "messages" in body:
            _check_messages(body["messages"])
    return None


def _check_rerank(body: dict[str, Any]) -> None:
    query = body.get("query")
    if not isinstance(query, str | dict):
        raise OpenAIError(400, "'query' is required: a string", param="query")
    documents = body.get("documents")
    if not isinstance(documents, str | dict) and not (isinstance(documents, list) and documents):
        raise OpenAIError(400, "'documents' must be a non-empty array of strings", param="documents")
    _opt_int(body, "top_n", 0)


def _parse_form(kind: Kind, raw: bytes, content_type: str | None) -> ParsedRequest:
    """An audio request: its ``model`` and ``stream`` form fields (the file stays in ``raw``)."""
    try:
        parts = multipart.parse(raw, multipart.boundary_of(content_type))
        fields = multipart.text_fields(parts, ("model", "stream", "user"))
    except multipart.MultipartError as err:
        raise OpenAIError(400, f"invalid multipart/form-data body: {err}") from None
    if not any(p.name == "file" and p.filename is not None for p in parts):
        raise OpenAIError(400, "'file' is required: an audio file", param="file")
    model = fields.get("model")
    if not model:
        raise OpenAIError(400, "'model' is required", param="model")
    stream = fields.get("stream", "").strip().lower()
    if stream not in _FORM_TRUE and stream not in _FORM_FALSE:
        raise OpenAIError(400, "'stream' must be a boolean", param="stream")
    return ParsedRequest(
        kind=kind, model=model, body={}, stream=stream in _FORM_TRUE, user=fields.get("user")
    )


# ---------------------------------------------------------------- SSE


def has_content(events: bytes) -> bool:
    """True when one of the complete SSE ``events`` carries generated content (text, delta, tools)."""
    for line in events.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if not payload or payload == b"[DONE]":
            continue
        try:
            chunk = _decode_json(payload)
        except msgspec.DecodeError:
            continue
        if not isinstance(chunk, dict):
            continue
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            if choice.get("text"):
                return True
            delta = choice.get("delta")
            if isinstance(delta, dict) and (
                delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls")
            ):
                return True
        # the Responses API's events: output text, reasoning or a tool call's arguments
        if chunk.get("type") in _RESPONSE_DELTAS and chunk.get("delta"):
            return True
        # the Messages API's: a content block's text, thinking or tool input
        if chunk.get("type") == "content_block_delta":
            delta = chunk.get("delta")
            if isinstance(delta, dict) and (
                delta.get("text") or delta.get("thinking") or delta.get("partial_json")
            ):
                return True
    return False


_RESPONSE_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.reasoning_text.delta",
        "response.function_call_arguments.delta",
    }
)


class SSEFramer:
    """Splits an upstream byte stream at SSE frame boundaries, so only whole events are forwarded.

    Chunks that end on a boundary (nearly all of them) pass through untouched; a frame split across
    chunks is held (as a list of its chunks, joined once: linear in its size) until its end
    arrives, up to ``max_frame`` bytes: an engine sending a larger event is cut off with
    ``UpstreamError("too_large")``. After a failure the held partial frame is dropped, so an error
    event can follow cleanly.
    """

    __slots__ = ("_held", "_max", "_pending")

    def __init__(self, max_frame: int = 64 * 1024 * 1024) -> None:
        self._pending: list[bytes] = []
        self._held = 0
        self._max = max_frame

    def feed(self, chunk: bytes) -> bytes:
        """The complete frames available after ``chunk`` (possibly empty)."""
        if not self._pending:
            if chunk.endswith(b"\n\n"):
                return chunk
            data = chunk
        else:
            ends_frame = b"\n\n" in chunk or (chunk[:1] == b"\n" and self._pending[-1].endswith(b"\n"))
            if not ends_frame:
                self._hold(chunk)
                return b""
            data = b"".join(self._pending) + chunk
            self._pending, self._held = [], 0
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._hold(data)
            return b""
        if cut + 2 < len(data):
            self._hold(data[cut + 2 :])
        return data[: cut + 2]

    def _hold(self, part: bytes) -> None:
        self._held += len(part)
        if self._held > self._max:
            self._pending, self._held = [], 0
            raise UpstreamError(
                "too_large", f"an event of the engine's stream is larger than {self._max} bytes"
            )
        self._pending.append(part)

    def flush(self) -> bytes:
        """Whatever is held at a clean end of stream."""
        data = b"".join(self._pending)
        self._pending, self._held = [], 0
        return data


# The event that ends an OpenAI stream as engines write it (LF or CRLF line ends, the space after
# "data:" optional); the compiled relay holds back the same four (router/native/src/relay.rs).
_DONE_EVENTS = (b"data: [DONE]\n\n", b"data: [DONE]\r\n\r\n", b"data:[DONE]\n\n", b"data:[DONE]\r\n\r\n")


def split_done(frames: bytes) -> tuple[bytes, bytes]:
    """``frames`` without the ``[DONE]`` event that ends them (one that starts a line), and that
    event: ``(frames, b"")`` when there is none."""
    for event in _DONE_EVENTS:
        at = len(frames) - len(event)
        if frames.endswith(event) and (at == 0 or frames[at - 1] == 0x0A):
            return frames[:at], frames[at:]
    return frames, b""


def error_event(status: int, message: str) -> bytes:
    """An SSE error frame as vLLM sends mid-stream (the openai SDK raises ``APIError`` on it)."""
    return b"data: " + msgspec.json.encode(error_body(status, message)) + b"\n\n"
