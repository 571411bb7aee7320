"""A request's prompt, selected once: what in a request is the prompt, its digest, and its tokens.

:func:`prompt_work` is the one place that reads the prompt out of a request (a chat's messages, a
completion's or an embedding's first prompt, or token ids as sent). :func:`check_prompt`, which
request parsing runs on every request, is where a prompt's shape and token ids are checked, so a bad
one is a 400 naming its field before any routing work. Policies see token ids (cache-aware) or text
(prefix_trie).

Tokens are uint32 arrays (:mod:`kvstack.common.token_cache`). Two caches, both keyed by 128-bit
digests computed once per request:

* whole prompts (:class:`PromptCache`): a repeated prompt comes back as the *same* array object, so
  the policy's block-key cache finds its keys by identity in O(1) instead of hashing it again;
* chat messages (:attr:`PromptCache.messages`): a shared system prompt, a document or the earlier
  turns of a chat are rendered once; a new request tokenizes only its new messages.

An engine's ``/tokenize`` answers are cached under :func:`engine_key`, the same digest scoped by
model (:mod:`.tokenizers`).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from kvstack.common import tokenizer
from kvstack.common.errors import OpenAIError
from kvstack.common.token_cache import MB, TokenCache, Tokens, as_tokens, digest, digest_of_digests

if TYPE_CHECKING:
    from kvstack.router.protocol import Kind, ParsedRequest

# Digest domains: a completion prompt never matches a chat, nor a whole chat (it ends with the
# generation prompt) the known start of one (:func:`known_prefix`: BOS and whole messages only). A
# plain message is keyed as the simulator keys it (:func:`tokenizer.message_digest`); one with more
# than a role and a text content by its JSON, which an engine's chat template may read all of.
_TEXT, _CHAT, _MESSAGE_JSON, _START, _ENGINE, _MODEL = b"t", b"c", b"j", b"s", b"e", b"M"
_MESSAGE = tokenizer.MESSAGE_DOMAIN
_BOS = array("I", [tokenizer.BOS_ID])
_GENERATION = array("I", tokenizer.GENERATION_PROMPT)
_encode = msgspec.json.encode

# which field holds the prompt, per endpoint (tokenize accepts either prompt or messages)
PROMPT_FIELD: dict[Kind, str] = {"chat": "messages", "completion": "prompt", "embedding": "input"}
MAX_TOKEN_ID = 2**32 - 1  # block keys hash each id as a uint32
_convert = msgspec.convert


class PromptCache(TokenCache):
    """Whole prompts' tokens (a :class:`TokenCache`), with the rendered chat messages they are
    joined from in :attr:`messages` (twice the budget: a system prompt or a document repeats far
    more than whole prompts do).

    The default budget holds sixty 32K-token documents, or about 4,000 short chats.
    """

    def __init__(self, max_bytes: int = 10 * MB) -> None:
        super().__init__(max_bytes)
        self.messages = TokenCache(2 * max_bytes)


# ---------------------------------------------------------------- what in a request is the prompt


def token_ids(value: Any, field: str, where: str | None = None) -> Tokens | None:
    """``value`` as token ids when it is a list of integers (None otherwise); a 400 naming
    ``field`` when one of them cannot be a token id (below 0, above 2**32-1). ``where`` is the
    list's place in the request, for the message (the field itself by default)."""
    if not isinstance(value, list):
        return None
    try:
        # msgspec refuses booleans, floats and the rest in C; the array, ids beyond uint32
        return array("I", _convert(value, list[int]))
    except msgspec.ValidationError:
        return None
    except OverflowError:
        pass
    for i, tid in enumerate(value):
        if not 0 <= tid <= MAX_TOKEN_ID:
            # a hostile id may have thousands of digits: never echo them all
            shown = str(tid) if abs(tid) < 10**40 else f"an integer of {tid.bit_length()} bits"
            raise OpenAIError(
                400,
                f"'{where or field}[{i}]' is {shown}: token ids are integers in 0..{MAX_TOKEN_ID}",
                param=field,
            )
    raise AssertionError("unreachable: the array refused an id in range")


def check_prompt(prompt: Any, field: str) -> None:
    """A completion's or an embedding's prompt: a string, strings, token ids, or lists of them;
    a 400 naming ``field`` otherwise."""
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return
        if isinstance(prompt[0], list):  # a batch of token id lists, none of them empty
            if all(p and token_ids(p, field, f"{field}[{j}]") is not None for j, p in enumerate(prompt)):
                return
        elif token_ids(prompt, field) is not None:
            return
    raise OpenAIError(400, f"'{field}' must be a string, an array of strings, or token ids", param=field)


def _first_prompt(request: ParsedRequest) -> tuple[str, Any]:
    """The prompt's field and its (first) prompt: a batch's first prompt stands for the request."""
    field = PROMPT_FIELD.get(request.kind, "prompt")  # tokenize: its prompt (messages: a chat)
    prompt = request.body.get(field)
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return field, prompt[0]
    return field, prompt


def message_text(content: Any) -> str:
    """The text of a chat message's content (a string, or the text parts of a content array)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text parts, joined by newlines as vLLM does
        return "\n".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


@dataclass(frozen=True, slots=True)
class PromptWork:
    """A prompt to tokenize: its cache digest, its size in characters, and the tokenizer's input.

    A chat carries its messages as sent (for an engine's chat template), their ``(role, text)``
    pairs (for the built-in one) and each message's digest (``parts``, the message cache's keys).
    """

    digest: int
    chars: int
    chat: list[tuple[str, str]] | None = None
    text: str | None = None
    parts: tuple[int, ...] = ()
    messages: list[dict[str, Any]] | None = None


def prompt_work(request: ParsedRequest) -> PromptWork | Tokens | None:
    """The request's (first) prompt: what tokenizing it takes, or its token ids as sent; None
    without a prompt. Token ids come back as a uint32 array; ids no array can hold are a 400."""
    messages = request.messages  # a chat's, or a response's input as messages
    if messages is not None:
        chat: list[tuple[str, str]] = []
        parts: list[int] = []
        chars = 0
        for m in messages:
            role, content = str(m["role"]), m.get("content")
            if content.__class__ is str and len(m) == 2:  # {"role", "content": text}: the usual
                pair = (role, content)
                parts.append(digest(_MESSAGE, pair))  # as the simulator keys it
            else:
                pair = (role, message_text(content))
                parts.append(digest(_MESSAGE_JSON, (_encode(m),)))
            chat.append(pair)
            chars += len(role) + len(pair[1])
        return PromptWork(digest_of_digests(_CHAT, parts), chars, chat, None, tuple(parts), messages)
    if request.kind not in PROMPT_FIELD and request.kind != "tokenize":
        # rerank, score, classify, pooling, audio: no prefix an engine would reuse across requests
        # worth keying (a response without text-only messages too): routed by model and load
        return None
    field, prompt = _first_prompt(request)
    if isinstance(prompt, str):
        return PromptWork(digest(_TEXT, (prompt,)), len(prompt), text=prompt)
    if isinstance(prompt, list) and prompt:
        try:
            return array("I", prompt)  # checked when the request was parsed (check_prompt)
        except (OverflowError, TypeError):
            return token_ids(prompt, field)  # a request not parsed: the 400 (or None) it deserves
    return None


def engine_key(model: str, work: PromptWork) -> int:
    """The cache key of an engine's tokens for ``work``: the prompt's digest, scoped by model (each
    model has its own tokenizer and template)."""
    return digest_of_digests(_ENGINE, (digest(_MODEL, (model,)), work.digest))


def tokenize(work: PromptWork) -> Tokens:
    """The tokens of ``work``, as the simulator makes them (a plain function: it runs in a worker too)."""
    if work.chat is not None:
        return chat_tokens(work, None)
    # No BOS: the simulator adds none to text prompts, and block keys must match its tokens.
    return as_tokens(tokenizer.encode(work.text or ""))


def render_message(message: tuple[str, str]) -> Tokens:
    """One chat message's tokens under the template (a plain function: it runs in a worker too)."""
    return tokenizer.render_message(*message)


def _renderer(message: tuple[str, str]) -> Callable[[], Tokens]:
    return lambda: render_message(message)


def _joined(parts: Sequence[int], chat: Sequence[tuple[str, str]], messages: TokenCache | None) -> Tokens:
    """The BOS and these messages' arrays joined; only messages ``messages`` lacks are rendered."""
    out = array("I", _BOS)
    for key, message in zip(parts, chat, strict=True):
        out += render_message(message) if messages is None else messages.get(key, _renderer(message))
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


def known_prefix(work: PromptWork, cache: PromptCache, max_tail_chars: int) -> KnownPrefix | None:
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
    known = 0
    for key in work.parts:
        if key not in messages:
            break
        known += 1
    if known == len(work.parts):
        return None
    tail = work.chat[known:]
    chars = sum(len(role) + len(content) for role, content in tail)
    if chars > max_tail_chars:
        return None
    parts, chat = work.parts[:known], work.chat[:known]
    out = cache.get(digest_of_digests(_START, parts), lambda: _joined(parts, chat, messages))
    estimate = chars // CHARS_PER_TOKEN + _TEMPLATE_TOKENS_PER_MESSAGE * len(tail) + len(_GENERATION)
    return KnownPrefix(out, len(out) + estimate, tuple(zip(work.parts[known:], tail, strict=True)))


def render_missing(prefix: KnownPrefix, messages: TokenCache) -> None:
    """Render the messages :func:`known_prefix` left out, so the next turn finds them cached."""
    for key, message in prefix.missing:
        messages.get(key, _renderer(message))


def prompt_token_ids(request: ParsedRequest, cache: PromptCache) -> Tokens | None:
    """The prompt as the engine tokenizes it (first prompt of a batch); None when it has none."""
    work = prompt_work(request)
    return work_tokens(work, cache) if isinstance(work, PromptWork) else work


def work_tokens(work: PromptWork, cache: PromptCache) -> Tokens:
    """The built-in tokenizer's tokens of ``work``, through ``cache``."""
    if work.chat is not None:
        return cache.get(work.digest, lambda: chat_tokens(work, cache.messages))
    return cache.get(work.digest, lambda: tokenize(work))


def prompt_text(request: ParsedRequest) -> str | None:
    """The prompt as text: a completion's (first) prompt, or a chat's message texts joined by newlines."""
    if request.messages is not None:
        return "\n".join(message_text(m.get("content")) for m in request.messages)
    _, prompt = _first_prompt(request)
    return prompt if isinstance(prompt, str) else None
