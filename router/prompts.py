"""A request's prompt as policies see it: token ids (cache-aware) or text (prefix_trie).

Token ids are cached by a 128-bit digest of the prompt, so a repeated prompt (a shared system prompt,
a multi-turn chat resent with one more message, a document asked about again) is tokenized once and,
more importantly, comes back as the *same* tuple object: the policy's block-key cache then finds its
keys by identity in O(1) instead of hashing the whole prompt again. The cache is bounded by entries
and by the tokens it holds, so a stream of long unique prompts cannot grow it without limit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import xxhash

from kvstack.common import tokenizer
from kvstack.router.protocol import ParsedRequest

_TEXT, _CHAT = b"t", b"c"  # digest domains: a completion prompt never matches a chat


class TokenCache:
    """LRU of ``digest -> token tuple``, at most ``max_entries`` entries and ``max_tokens`` tokens.

    A held token costs one 8-byte pointer (ids are the tokenizer's shared int objects), so the
    default budget bounds the cache near 16 MB: sixty 32K-token documents, or 4096 short chats.
    """

    def __init__(self, max_entries: int = 4096, max_tokens: int = 2_000_000) -> None:
        if max_entries <= 0 or max_tokens <= 0:
            raise ValueError("max_entries and max_tokens must be positive")
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self.tokens = 0  # held, summed over entries
        self.hits = 0
        self.misses = 0

    def get(self, digest: int, make: Callable[[], Sequence[int]]) -> tuple[int, ...]:
        """The cached tokens for ``digest``, or ``make()``'s, remembered when they fit."""
        found = self._entries.get(digest)
        if found is not None:
            self._entries.move_to_end(digest)
            self.hits += 1
            return found
        self.misses += 1
        made = tuple(make())
        if len(made) > self.max_tokens:
            return made  # larger than the whole budget: never evict everything for one prompt
        self._entries[digest] = made
        self.tokens += len(made)
        while len(self._entries) > self.max_entries or self.tokens > self.max_tokens:
            _, dropped = self._entries.popitem(last=False)
            self.tokens -= len(dropped)
        return made

    def __contains__(self, digest: object) -> bool:
        return digest in self._entries

    def __len__(self) -> int:
        return len(self._entries)


def message_text(content: Any) -> str:
    """The text of a chat message's content (a string, or the text parts of a content array)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text parts reach the tokenizer
        return "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def _chat_pairs(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(str(m["role"]), message_text(m.get("content"))) for m in messages]


def _digest(domain: bytes, parts: Sequence[str]) -> int:
    # Length-prefixed parts: no choice of separator inside the texts can make two prompts collide.
    h = xxhash.xxh3_128(domain)
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return int(h.intdigest())


def _has_messages(request: ParsedRequest) -> bool:
    return request.kind == "chat" or (request.kind == "tokenize" and "messages" in request.body)


def _first_prompt(request: ParsedRequest) -> Any:
    body = request.body
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return prompt[0]  # a batch: the first prompt stands for the request
    return prompt


def prompt_token_ids(request: ParsedRequest, cache: TokenCache) -> Sequence[int] | None:
    """The prompt as the engine tokenizes it (first prompt of a batch); None when it has none."""
    if _has_messages(request):
        pairs = _chat_pairs(request.body["messages"])
        flat = [s for pair in pairs for s in pair]
        return cache.get(
            _digest(_CHAT, flat), lambda: tokenizer.apply_chat_template(pairs, add_generation_prompt=True)
        )
    prompt = _first_prompt(request)
    if isinstance(prompt, str):
        # No BOS: the simulator adds none to text prompts, and block keys must match its tokens.
        return cache.get(_digest(_TEXT, (prompt,)), lambda: tokenizer.encode(prompt))
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return prompt  # token ids as sent
    return None


def prompt_text(request: ParsedRequest) -> str | None:
    """The prompt as text: a completion's (first) prompt, or a chat's message texts joined by newlines."""
    if _has_messages(request):
        return "\n".join(message_text(m.get("content")) for m in request.body["messages"])
    prompt = _first_prompt(request)
    return prompt if isinstance(prompt, str) else None
