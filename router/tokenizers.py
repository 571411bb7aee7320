"""Prompt token ids from the engine's own tokenizer, for the cache-aware policy (``tokenizer: engine``).

Block keys are hashed from token ids, and the KV events an engine publishes carry *its* token ids.
The simulator tokenizes with :mod:`kvstack.common.tokenizer`, so the built-in tokenizer agrees with
it token for token. Real vLLM uses the model's HF tokenizer and chat template: the router must then
ask an engine (``POST /tokenize``), or its block keys never match the engines' and it predicts no
hits. :class:`EngineTokenizer` does that through the router's shared upstream client, for the prompt
:func:`~kvstack.router.prompts.prompt_work` selected, remembering answers in a
:class:`~kvstack.common.token_cache.TokenCache` under :func:`~kvstack.router.prompts.engine_key`
(the prompt's digest, scoped by model), so a repeated prompt costs no round trip.

The ``/tokenize`` fields are set explicitly to what vLLM 0.24's generation endpoints render:
``/v1/chat/completions`` applies the chat template with ``add_generation_prompt=True`` and adds no
special tokens of its own (the template holds the BOS); ``/v1/completions`` adds them
(``add_special_tokens=True``, so the BOS leads).
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import msgspec

from kvstack.common.token_cache import TokenCache, Tokens
from kvstack.router.prompts import PromptWork, engine_key
from kvstack.router.upstream import Upstream, UpstreamError

log = logging.getLogger(__name__)

Messages = Sequence[dict[str, Any]]
_JSON = [(b"content-type", b"application/json")]
_encode = msgspec.json.encode
_decode = msgspec.json.Decoder().decode


class TokenizeError(Exception):
    """No engine could tokenize the prompt (all unreachable, or all answered with an error)."""


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


def parse_tokens(raw: bytes) -> Tokens:
    """The ``tokens`` of a ``/tokenize`` answer; ``ValueError`` when there are none."""
    data = _decode(raw)
    tokens = data.get("tokens") if isinstance(data, dict) else None
    try:
        return array("I", msgspec.convert(tokens, list[int]))
    except (msgspec.ValidationError, OverflowError):
        raise ValueError("the /tokenize answer has no 'tokens' list of token ids") from None


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
        cache: TokenCache | None = None,
        max_tries: int = 2,
    ) -> None:
        self._client = client
        self._endpoints = endpoints
        self.cache = cache if cache is not None else TokenCache()
        self._max_tries = max_tries
        self.requests = 0  # round trips made (cache misses that reached an engine)
        self.failures = 0

    async def tokens(self, model: str, work: PromptWork) -> Tokens:
        """The tokens the engine prefills for ``work`` (a chat, or a text prompt), cached."""
        key = engine_key(model, work)
        found = self.cache.find(key)
        if found is not None:
            return found
        if work.messages is not None:
            body = tokenize_body(model, messages=work.messages)
        else:
            body = tokenize_body(model, prompt=work.text or "")
        return self.cache.put(key, await self._ask(model, body))

    async def _ask(self, model: str, body: bytes) -> Tokens:
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
