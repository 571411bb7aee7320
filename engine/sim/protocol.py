"""OpenAI request models and vLLM 0.24 response shapes for the simulator; pure functions, no I/O.

Requests are validated with pydantic (a bad field becomes a 400 naming it, as in vLLM). Responses are
rendered straight to bytes: stream chunks come from per-request templates, so the hot path costs one
``json.dumps`` of the text delta per chunk instead of building and validating a model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvstack.common.errors import OpenAIError
from kvstack.common.tokenizer import VOCAB_SIZE, apply_chat_template, decode, encode

_dumps = json.dumps
_M = TypeVar("_M", bound=BaseModel)
_BYTE_IDS = 256  # ids below this are byte-fallback tokens


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _GenerationRequest(BaseModel):
    """Fields shared by completions and chat completions; unknown fields are accepted, as vLLM does."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    user: str | None = None
    cache_salt: str | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("Stream options can only be defined when `stream=True`.")
        if self.cache_salt is not None and not self.cache_salt:
            raise ValueError("Parameter 'cache_salt' must be a non-empty string if provided.")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return tuple(s for s in stops if s)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    add_generation_prompt: bool = True


class TokenizeRequest(BaseModel):
    """``/tokenize``: the completion form (``prompt``) or the chat form (``messages``)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_form(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of 'prompt' or 'messages' is required")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[int]


def parse(model: type[_M], body: bytes) -> _M:
    """Validate a JSON body; invalid JSON or fields become a 400 naming the problem."""
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        problem = err.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in problem["loc"])
        raise OpenAIError(
            400, f"{loc}: {problem['msg']}" if loc else problem["msg"], param=loc or None
        ) from err


# --- prompts -----------------------------------------------------------------------------------------


def check_token_ids(ids: list[int]) -> list[int]:
    for tid in ids:
        if not 0 <= tid < VOCAB_SIZE:
            raise OpenAIError(400, f"Token id {tid} is out of vocabulary", param="prompt")
    return ids


def completion_prompt_ids(prompt: str | list[int] | list[str] | list[list[int]]) -> tuple[list[int], bool]:
    """Token ids of a completion prompt and whether it was text (text prompts are capped when counted)."""
    if isinstance(prompt, str):
        ids, is_text = encode(prompt), True
    elif not prompt or isinstance(prompt[0], int):
        ids, is_text = check_token_ids(prompt), False  # type: ignore[arg-type]
    elif len(prompt) == 1:
        return completion_prompt_ids(prompt[0])
    else:
        raise OpenAIError(400, "the simulator serves one prompt per request; send a batch as requests")
    if not ids:
        raise OpenAIError(400, "The decoder prompt cannot be empty", param="prompt")
    return ids, is_text


def message_text(content: str | list[TextPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.text for part in content)


def chat_prompt_ids(messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
    pairs = [(m.role, message_text(m.content)) for m in messages]
    return apply_chat_template(pairs, add_generation_prompt=add_generation_prompt)


def check_length(prompt_len: int, max_tokens: int | None, max_model_len: int, *, is_text: bool) -> int:
    """The request's max_tokens after vLLM 0.24's context-length check (renderers/params.py)."""
    requested = max_tokens or 0
    max_input = max_model_len - requested
    if prompt_len > max_input or prompt_len >= max_model_len:
        # Text is tokenized with truncation at max_input + 1, so vLLM can only say "at least".
        shown = max_input + 1 if is_text and prompt_len > max_input else prompt_len
        qual = "at least " if is_text and prompt_len > max_input else ""
        raise OpenAIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{requested} output tokens and your prompt contains {qual}{shown} input tokens, for a total of "
            f"{qual}{shown + requested} tokens. Please reduce the length of the input prompt or the number "
            f"of requested output tokens. (parameter=input_tokens, value={shown})",
            param="input_tokens",
        )
    return max_tokens if max_tokens is not None else max_model_len - prompt_len


# --- stop strings ------------------------------------------------------------------------------------


class StopMatcher:
    """Holds back just enough streamed text that a stop string never reaches the client."""

    __slots__ = ("_hold", "_include", "_stops", "_text", "sent", "stop_reason")

    def __init__(self, stops: tuple[str, ...], include_stop: bool = False) -> None:
        self._stops = stops
        self._include = include_stop
        self._hold = max(len(s) for s in stops) - 1
        self._text = ""
        self.sent = 0  # characters of _text already released
        self.stop_reason: str | None = None

    def feed(self, delta: str) -> str:
        """Text safe to release now; sets ``stop_reason`` when a stop string matched."""
        start = max(0, len(self._text) - self._hold)
        self._text += delta
        best = -1
        for stop in self._stops:
            at = self._text.find(stop, start)
            if at != -1 and (best == -1 or at < best):
                best, self.stop_reason = at, stop
        if best != -1:
            end = best + len(self.stop_reason or "") if self._include else best
            out = self._text[self.sent : end]
            self.sent = end
            return out
        end = max(self.sent, len(self._text) - self._hold)
        out = self._text[self.sent : end]
        self.sent = end
        return out

    def flush(self) -> str:
        out = self._text[self.sent :]
        self.sent = len(self._text)
        return out


class Detokenizer:
    """Incremental decode that never splits a UTF-8 character across two stream chunks."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending: list[int] = []

    def __call__(self, ids: list[int]) -> str:
        if self._pending:
            ids, self._pending = self._pending + ids, []
        if ids and ids[-1] < _BYTE_IDS:  # trailing byte-fallback ids may be half a character
            start = len(ids)
            while start > 0 and ids[start - 1] < _BYTE_IDS:
                start -= 1
            try:
                bytes(ids[start:]).decode()
            except UnicodeDecodeError:
                if len(ids) - start < 4:
                    self._pending = ids[start:]
                    ids = ids[:start]
        return decode(ids)

    def flush(self) -> str:
        out, self._pending = decode(self._pending), []
        return out


# --- responses ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "completion_tokens": self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


class ChunkWriter:
    """SSE frames of one streamed response, rendered from templates fixed at request start."""

    __slots__ = ("_chat", "_head", "_tail", "_tail_done", "_usage_head")

    def __init__(self, *, chat: bool, request_id: str, model: str, created: int) -> None:
        self._chat = chat
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = f'data: {{"id":"{request_id}","object":"{obj}","created":{created},"model":{_dumps(model)},'
        self._usage_head = (head + '"choices":[],"usage":').encode()
        if chat:
            self._head = (head + '"choices":[{"index":0,"delta":{"content":').encode()
            self._tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'
            self._tail_done = b'},"logprobs":null,"finish_reason":'
        else:
            self._head = (head + '"choices":[{"index":0,"text":').encode()
            self._tail = b',"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
            self._tail_done = b',"logprobs":null,"finish_reason":'

    def role_frame(self) -> bytes:
        """The chat stream's first chunk: the assistant role with empty content."""
        return self._head.replace(b'"delta":{"content":', b'"delta":{"role":"assistant","content":') + (
            b'""' + self._tail
        )

    def text_frame(self, text: str) -> bytes:
        return self._head + _dumps(text).encode() + self._tail

    def final_frame(self, text: str, finish_reason: str, stop_reason: str | None) -> bytes:
        reasons = f'{_dumps(finish_reason)},"stop_reason":{_dumps(stop_reason)}}}]}}\n\n'
        return self._head + _dumps(text).encode() + self._tail_done + reasons.encode()

    def usage_frame(self, usage: Usage) -> bytes:
        return self._usage_head + _dumps(usage.as_dict(), separators=(",", ":")).encode() + b"}\n\n"


DONE_FRAME = b"data: [DONE]\n\n"


def completion_body(
    *, request_id: str, model: str, text: str, finish_reason: str, stop_reason: str | None, usage: Usage
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
                "prompt_logprobs": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage.as_dict(),
        "kv_transfer_params": None,
    }


def chat_body(
    *, request_id: str, model: str, text: str, finish_reason: str, stop_reason: str | None, usage: Usage
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text,
        "refusal": None,
        "annotations": None,
        "audio": None,
    }
    message |= {"function_call": None, "tool_calls": [], "reasoning_content": None}
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
            }
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage.as_dict(),
        "prompt_logprobs": None,
        "kv_transfer_params": None,
    }


def model_card(
    name: str, root: str, parent: str | None, max_model_len: int | None, created: int
) -> dict[str, Any]:
    """vLLM's ModelCard: a served model (no parent) or a LoRA adapter (its base model as parent)."""
    perm = {
        "id": f"modelperm-{name}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
        "permission": [perm],
    }


def models_body(names: list[str], root: str, max_model_len: int, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(n, root, None, max_model_len, created) for n in names]}
