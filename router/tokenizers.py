"""Prompt token ids for the cache-aware policy: kvstack's built-in tokenizer, or the engine's own.

Block keys are hashed from token ids, and the KV events an engine publishes carry *its* token ids.
The simulator tokenizes with :mod:`kvstack.common.tokenizer`, so the built-in tokenizer agrees with
it token for token. Real vLLM uses the model's HF tokenizer and chat template: the router must then
ask an engine (``POST /tokenize``), or its block keys never match the engines' and it predicts no
hits. :class:`EngineTokenizer` does that through the router's shared upstream client, remembering
answers in a bounded LRU keyed by a digest of the input, so a repeated prompt costs no round trip.

The ``/tokenize`` fields are set explicitly to what vLLM 0.24's generation endpoints render:
``/v1/chat/completions`` applies the chat template with ``add_generation_prompt=True`` and adds no
special tokens of its own (the template holds the BOS); ``/v1/completions`` adds them
(``add_special_tokens=True``, so the BOS leads).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import httpx
import msgspec
import xxhash

from kvstack.common import tokenizer as builtin
from kvstack.router.prompts import message_text
from kvstack.router.protocol import ParsedRequest
from kvstack.router.upstream import Upstream, UpstreamError

log = logging.getLogger(__name__)

Messages = Sequence[dict[str, Any]]
_JSON = [(b"content-type", b"application/json")]
_encode = msgspec.json.encode
_decode = msgspec.json.Decoder().decode


class TokenizeError(Exception):
    """No engine could tokenize the prompt (all unreachable, or all answered with an error)."""


class Tokenizer(Protocol):
    """Turns a chat or a completion prompt into the token ids the engine will prefill."""

    async def chat(self, model: str, messages: Messages) -> Sequence[int]: ...

    async def completion(self, model: str, prompt: str) -> Sequence[int]: ...


class BuiltinTokenizer:
    """kvstack's own tokenizer and Llama-3-style template: what the simulator uses."""

    async def chat(self, model: str, messages: Messages) -> Sequence[int]:
        pairs = [(str(m.get("role", "")), message_text(m.get("content"))) for m in messages]
        return builtin.apply_chat_template(pairs, add_generation_prompt=True)

    async def completion(self, model: str, prompt: str) -> Sequence[int]:
        return builtin.encode(prompt)  # the simulator adds no BOS to text prompts


class LRU:
    """``digest -> token tuple``, at most ``max_entries`` entries and ``max_tokens`` tokens held."""

    def __init__(self, max_entries: int = 4096, max_tokens: int = 2_000_000) -> None:
        if max_entries <= 0 or max_tokens <= 0:
            raise ValueError("max_entries and max_tokens must be positive")
        self.max_entries, self.max_tokens = max_entries, max_tokens
        self._items: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self.tokens = self.hits = self.misses = 0

    def get(self, key: int) -> tuple[int, ...] | None:
        found = self._items.get(key)
        if found is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return found

    def put(self, key: int, tokens: tuple[int, ...]) -> None:
        if len(tokens) > self.max_tokens or key in self._items:
            return  # never evict everything for one prompt
        self._items[key] = tokens
        self.tokens += len(tokens)
        while len(self._items) > self.max_entries or self.tokens > self.max_tokens:
            _, dropped = self._items.popitem(last=False)
            self.tokens -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)


def input_digest(kind: str, model: str, payload: Any) -> int:
    """A 128-bit digest of one tokenizer input; the kind and model are part of it."""
    h = xxhash.xxh3_128(kind.encode())
    h.update(_encode([model, payload]))
    return int(h.intdigest())


def tokenize_body(model: str, *, messages: Messages | None = None, prompt: str | None = None) -> bytes:
    """The ``/tokenize`` request that renders exactly what the matching generation endpoint prefills."""
    if messages is not None:
        body: dict[str, Any] = {
            "model": model,
            "messages": list(messages),
            "add_generation_prompt": True,
            "add_special_tokens": False,
        }
    else:
        body = {"model": model, "prompt": prompt, "add_special_tokens": True}
    return _encode(body)


def parse_tokens(raw: bytes) -> tuple[int, ...]:
    """The ``tokens`` of a ``/tokenize`` answer; ``ValueError`` when there are none."""
    data = _decode(raw)
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise ValueError("the /tokenize answer has no 'tokens' list")
    return tuple(tokens)


Client = Upstream | httpx.AsyncClient


async def _post(client: Client, url: str, body: bytes) -> tuple[int, bytes]:
    if isinstance(client, httpx.AsyncClient):
        resp = await client.post(url, content=body, headers={"content-type": "application/json"})
        return resp.status_code, resp.content
    answer = await client.send("POST", url, _JSON, body)
    try:
        return answer.status, await answer.read()
    finally:
        await answer.aclose()


class EngineTokenizer:
    """Asks an engine serving the model (``POST /tokenize``); answers are cached by input digest.

    ``endpoints(model)`` gives base URLs to try in order (the router passes the model's available
    engines); the next is tried when one fails. Every engine of a model shares its tokenizer, so
    any of them will do.
    """

    def __init__(
        self,
        client: Client,
        endpoints: Callable[[str], Sequence[str]],
        cache: LRU | None = None,
        max_tries: int = 2,
    ) -> None:
        self._client = client
        self._endpoints = endpoints
        self.cache = cache if cache is not None else LRU()
        self._max_tries = max_tries
        self.requests = 0  # round trips made (cache misses that reached an engine)
        self.failures = 0

    async def chat(self, model: str, messages: Messages) -> Sequence[int]:
        key = input_digest("chat", model, list(messages))
        return await self._cached(key, model, tokenize_body(model, messages=messages))

    async def completion(self, model: str, prompt: str) -> Sequence[int]:
        key = input_digest("completion", model, prompt)
        return await self._cached(key, model, tokenize_body(model, prompt=prompt))

    async def _cached(self, key: int, model: str, body: bytes) -> tuple[int, ...]:
        found = self.cache.get(key)
        if found is not None:
            return found
        tokens = await self._ask(model, body)
        self.cache.put(key, tokens)
        return tokens

    async def _ask(self, model: str, body: bytes) -> tuple[int, ...]:
        last = "no engine serves the model"
        for url in list(self._endpoints(model))[: self._max_tries]:
            self.requests += 1
            try:
                status, raw = await _post(self._client, url + "/tokenize", body)
                if status == 200:
                    return parse_tokens(raw)
                last = f"{url} answered {status}: {raw[:200]!r}"
            except (UpstreamError, httpx.HTTPError, ValueError, msgspec.DecodeError) as err:
                last = f"{url}: {type(err).__name__}: {err}"
            self.failures += 1
        raise TokenizeError(f"could not tokenize for model {model!r}: {last}")


async def request_tokens(tokenizer: Tokenizer, request: ParsedRequest) -> Sequence[int] | None:
    """The request's prompt tokens (the first prompt of a batch); None when it has none."""
    body, model = request.body, request.model or ""
    if request.kind == "chat" or (request.kind == "tokenize" and "messages" in body):
        return await tokenizer.chat(model, body["messages"])
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch: the first prompt stands for the request
    if isinstance(prompt, str):
        return await tokenizer.completion(model, prompt)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return prompt  # token ids as sent
    return None
