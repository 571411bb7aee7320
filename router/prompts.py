"""A request's prompt as policies see it: token ids (cache-aware) or text (prefix_trie).

Token ids are uint32 arrays (``array("I")``): block keys hash their bytes in place, and a chat's
prompt is its messages' arrays joined by ``memcpy``, with no int objects made per token. Two
caches, both keyed by 128-bit digests computed once per request (:func:`prompt_work`):

* whole prompts: a repeated prompt comes back as the *same* array object, so the policy's block-key
  cache finds its keys by identity in O(1) instead of hashing the whole prompt again;
* chat messages: a shared system prompt, a document or the earlier turns of a chat are rendered
  once; a new request tokenizes only its new messages.

Both are bounded by entries and by the tokens they hold, so long unique prompts cannot grow them
without limit.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import xxhash

from kvstack.common import tokenizer
from kvstack.router.protocol import ParsedRequest

# Digest domains: a completion prompt never matches a chat, nor a whole chat (it ends with the
# generation prompt) the known start of one (:func:`known_prefix`: BOS and whole messages only).
_TEXT, _CHAT, _MESSAGE, _START = b"t", b"c", b"m", b"s"
_BOS = array("I", [tokenizer.BOS_ID])
_GENERATION = array("I", tokenizer.GENERATION_PROMPT)

if TYPE_CHECKING:
    Tokens = array[int]  # array("I"): one uint32 per token id
else:
    Tokens = array


def as_tokens(ids: Sequence[int]) -> Tokens:
    """``ids`` as a uint32 array (the same object when it already is one)."""
    if isinstance(ids, array) and ids.typecode == "I":
        return ids
    return array("I", ids)


class TokenCache:
    """LRU of ``digest -> token array``, at most ``max_entries`` entries and ``max_tokens`` tokens.

    A held token costs 4 bytes, so the default budget bounds the cache near 8 MB: sixty 32K-token
    documents, or 4096 short chats. :attr:`messages` holds rendered chat messages the same way.
    """

    def __init__(
        self, max_entries: int = 4096, max_tokens: int = 2_000_000, *, messages: bool = True
    ) -> None:
        if max_entries <= 0 or max_tokens <= 0:
            raise ValueError("max_entries and max_tokens must be positive")
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, Tokens] = OrderedDict()
        self.tokens = 0  # held, summed over entries
        self.hits = 0
        self.misses = 0
        self._fresh: tuple[int, Tokens] | None = None  # the last put(), for the get() after it
        # rendered messages: a system prompt or a document repeats far more than whole prompts do
        self.messages: TokenCache | None = (
            TokenCache(2 * max_entries, 2 * max_tokens, messages=False) if messages else None
        )

    def get(self, digest: int, make: Callable[[], Sequence[int]]) -> Tokens:
        """The cached tokens for ``digest``, or ``make()``'s, remembered when they fit."""
        fresh = self._fresh
        if fresh is not None:
            self._fresh = None
            if fresh[0] == digest:
                return fresh[1]  # just put(): that lookup was counted there
        found = self._entries.get(digest)
        if found is not None:
            self._entries.move_to_end(digest)
            self.hits += 1
            return found
        self.misses += 1
        return self._remember(digest, as_tokens(make()))

    def put(self, digest: int, tokens: Sequence[int]) -> Tokens:
        """Remember tokens made elsewhere (a worker process); counts as the miss it was.

        The next :meth:`get` of ``digest`` returns them uncounted, even when they were too large to
        keep. A concurrent twin that was put first wins, so identical prompts share one array.
        """
        found = self._entries.get(digest)
        if found is None:
            self.misses += 1
            found = self._remember(digest, as_tokens(tokens))
        self._fresh = (digest, found)
        return found

    def _remember(self, digest: int, made: Tokens) -> Tokens:
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
    if isinstance(content, list):  # content parts: only text parts, joined by newlines as vLLM does
        return "\n".join(
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


def _parts_digest(domain: bytes, parts: Sequence[int]) -> int:
    """One digest over message digests (fixed 16 bytes each, so no framing is needed)."""
    h = xxhash.xxh3_128(domain)
    for part in parts:
        h.update(part.to_bytes(16, "little"))
    return int(h.intdigest())


def _has_messages(request: ParsedRequest) -> bool:
    return request.kind == "chat" or (request.kind == "tokenize" and "messages" in request.body)


def _first_prompt(request: ParsedRequest) -> Any:
    body = request.body
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return prompt[0]  # a batch: the first prompt stands for the request
    return prompt


@dataclass(frozen=True, slots=True)
class PromptWork:
    """A prompt to tokenize: its cache digest, its size in characters, and the tokenizer's input.

    A chat also carries each message's digest (``parts``, aligned with ``chat``): the message cache's keys.
    """

    digest: int
    chars: int
    chat: list[tuple[str, str]] | None = None
    text: str | None = None
    parts: tuple[int, ...] = ()


def prompt_work(request: ParsedRequest) -> PromptWork | Sequence[int] | None:
    """What tokenizing the request's (first) prompt takes; token ids as sent; None without a prompt."""
    if _has_messages(request):
        pairs = _chat_pairs(request.body["messages"])
        parts = tuple(_digest(_MESSAGE, pair) for pair in pairs)
        chars = sum(len(r) + len(c) for r, c in pairs)
        return PromptWork(_parts_digest(_CHAT, parts), chars, chat=pairs, parts=parts)
    prompt = _first_prompt(request)
    if isinstance(prompt, str):
        return PromptWork(_digest(_TEXT, (prompt,)), len(prompt), text=prompt)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return prompt  # token ids as sent
    return None


def tokenize(work: PromptWork) -> Tokens:
    """The tokens of ``work``, as the simulator makes them (a plain function: it runs in a worker too)."""
    if work.chat is not None:
        return chat_tokens(work, None)
    # No BOS: the simulator adds none to text prompts, and block keys must match its tokens.
    return as_tokens(tokenizer.encode(work.text or ""))


def render_message(message: tuple[str, str]) -> Tokens:
    """One chat message's tokens under the template (a plain function: it runs in a worker too)."""
    return as_tokens(tokenizer.render_message(*message))


def _renderer(message: tuple[str, str]) -> Callable[[], Tokens]:
    return lambda: render_message(message)


def _joined(parts: Sequence[int], chat: Sequence[tuple[str, str]], messages: TokenCache | None) -> Tokens:
    """The BOS and these messages' arrays joined; only messages ``messages`` lacks are rendered."""
    out = array("I", _BOS)
    for digest, message in zip(parts, chat, strict=True):
        out += render_message(message) if messages is None else messages.get(digest, _renderer(message))
    return out


def chat_tokens(work: PromptWork, messages: TokenCache | None) -> Tokens:
    """A chat's tokens, its messages' arrays joined; only messages ``messages`` lacks are rendered."""
    assert work.chat is not None
    out = _joined(work.parts, work.chat, messages)
    out += _GENERATION
    return out


# Estimating a message's tokens before it is rendered: the built-in tokenizer's density on English
# text, and the template's tokens around each message (header, role, blank line, end of turn).
CHARS_PER_TOKEN = 3
_TEMPLATE_TOKENS_PER_MESSAGE = 6


@dataclass(frozen=True, slots=True)
class KnownPrefix:
    """A chat's tokens up to the first message not yet rendered, with the rest left for later.

    ``tokens`` is an exact prefix of the prompt's tokens (its block keys are the prompt's);
    ``total`` estimates the whole prompt's length; ``missing`` (digest, message) are the messages
    from the first unrendered one on, which :func:`render_missing` renders after routing.
    """

    tokens: Tokens
    total: int
    missing: tuple[tuple[int, tuple[str, str]], ...]


def known_prefix(work: PromptWork, cache: TokenCache, max_tail_chars: int) -> KnownPrefix | None:
    """Route a new turn on what is already rendered: the prefix before its first unrendered message.

    None when every message is rendered (the whole prompt is then a cheap join) or when the messages
    from the first unrendered one on exceed ``max_tail_chars`` (a new document, or a history the
    router has not seen: those blocks may well be cached somewhere, so they are worth their tokens).
    A short new turn's own blocks are cached nowhere yet, so its tokens cannot change the decision,
    only delay it.

    The joined prefix is kept in ``cache``: requests on the same known start (a group's system
    prompt, a document) get the same array, so their block keys are found by identity.
    """
    assert work.chat is not None
    messages = cache.messages
    assert messages is not None
    known = 0
    for digest in work.parts:
        if digest not in messages:
            break
        known += 1
    if known == len(work.parts):
        return None
    tail = work.chat[known:]
    chars = sum(len(role) + len(content) for role, content in tail)
    if chars > max_tail_chars:
        return None
    parts, chat = work.parts[:known], work.chat[:known]
    out = cache.get(_parts_digest(_START, parts), lambda: _joined(parts, chat, messages))
    estimate = chars // CHARS_PER_TOKEN + _TEMPLATE_TOKENS_PER_MESSAGE * len(tail) + len(_GENERATION)
    return KnownPrefix(out, len(out) + estimate, tuple(zip(work.parts[known:], tail, strict=True)))


def render_missing(prefix: KnownPrefix, messages: TokenCache) -> None:
    """Render the messages :func:`known_prefix` left out, so the next turn finds them cached."""
    for digest, message in prefix.missing:
        messages.get(digest, _renderer(message))


def prompt_token_ids(request: ParsedRequest, cache: TokenCache) -> Sequence[int] | None:
    """The prompt as the engine tokenizes it (first prompt of a batch); None when it has none."""
    return work_tokens(prompt_work(request), cache)


def work_tokens(work: PromptWork | Sequence[int] | None, cache: TokenCache) -> Sequence[int] | None:
    """The tokens of :func:`prompt_work`'s answer (for a caller that already has it)."""
    if not isinstance(work, PromptWork):
        return work
    if work.chat is not None:
        return cache.get(work.digest, lambda: chat_tokens(work, cache.messages))
    return cache.get(work.digest, lambda: tokenize(work))


def prompt_text(request: ParsedRequest) -> str | None:
    """The prompt as text: a completion's (first) prompt, or a chat's message texts joined by newlines."""
    if _has_messages(request):
        return "\n".join(message_text(m.get("content")) for m in request.body["messages"])
    prompt = _first_prompt(request)
    return prompt if isinstance(prompt, str) else None
