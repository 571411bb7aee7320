"""A deterministic, dependency-free tokenizer shared by the simulator and the router.

Real engines use a BPE tokenizer downloaded from a model hub; neither a download nor a
per-model vocabulary is available here, and the simulator and the router must agree token for
token. This tokenizer is:

* reversible: ``decode(encode(text)) == text`` for every string;
* fast: one ``re.findall`` pass in C plus one dict lookup per token;
* BPE-like in density: about 3 characters per token on English text;
* bounded: every id is below :data:`VOCAB_SIZE` (less than Llama-3's 128,256).

Pieces are lowercase runs of 1-3 letters, a capital followed by up to two lowercase letters,
runs of 1-3 digits, runs of 1-4 spaces, each optionally preceded by one space; anything else
falls back to its UTF-8 bytes (ids 0-255), as byte-level BPE does.
"""

from __future__ import annotations

import itertools
import re
import string
from array import array
from collections.abc import Iterable, Sequence

from kvstack.common.token_cache import MB, TokenCache, Tokens, digest

_LOWER = string.ascii_lowercase
_UPPER = string.ascii_uppercase


def _build_vocab() -> list[str]:
    pieces: list[str] = []
    for n in (1, 2, 3):
        pieces.extend("".join(p) for p in itertools.product(_LOWER, repeat=n))
    for cap in _UPPER:
        pieces.append(cap)
        pieces.extend(cap + c for c in _LOWER)
        pieces.extend(cap + "".join(p) for p in itertools.product(_LOWER, repeat=2))
    for n in (1, 2, 3):
        pieces.extend("".join(p) for p in itertools.product(string.digits, repeat=n))
    spaced = [" " + p for p in pieces]
    return [*pieces, *spaced, " ", "  ", "   ", "    ", "\n", "\n\n", "\t"]


_PIECES: list[str] = _build_vocab()
_BYTE_IDS = 256
_PIECE_TO_ID: dict[str, int] = {p: i + _BYTE_IDS for i, p in enumerate(_PIECES)}

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
_SPECIAL_BASE = _BYTE_IDS + len(_PIECES)
SPECIAL_IDS: dict[str, int] = {tok: _SPECIAL_BASE + i for i, tok in enumerate(SPECIAL_TOKENS)}
BOS_ID = SPECIAL_IDS["<|begin_of_text|>"]
EOS_ID = SPECIAL_IDS["<|end_of_text|>"]
START_HEADER_ID = SPECIAL_IDS["<|start_header_id|>"]
END_HEADER_ID = SPECIAL_IDS["<|end_header_id|>"]
EOT_ID = SPECIAL_IDS["<|eot_id|>"]
VOCAB_SIZE = _SPECIAL_BASE + len(SPECIAL_TOKENS)

_ID_TO_TEXT: list[str] = [""] * _BYTE_IDS + _PIECES + list(SPECIAL_TOKENS)

# Order matters: the regex engine takes the first alternative that matches at each position.
_PIECE_RE = re.compile(
    r" ?[a-z]{1,3}| ?[A-Z][a-z]{0,2}| ?[0-9]{1,3}| {1,4}|\n\n|\n|\t|.",
    re.DOTALL,
)


def encode(text: str) -> list[int]:
    """Token ids for ``text``; no special tokens are added."""
    pieces = _PIECE_RE.findall(text)
    # One C-level pass over the pieces; only text with out-of-vocabulary pieces takes the slow path.
    ids: list[int | None] = list(map(_PIECE_TO_ID.get, pieces))
    if None not in ids:
        return ids  # type: ignore[return-value]  # no None left: every piece was in the vocabulary
    out: list[int] = []
    for piece, tid in zip(pieces, ids, strict=True):
        if tid is None:
            out.extend(piece.encode("utf-8"))
        else:
            out.append(tid)
    return out


def decode(ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
    """Text for ``ids``. Byte-fallback ids are joined and decoded as UTF-8."""
    out: list[str] = []
    pending = bytearray()
    for tid in ids:
        if 0 <= tid < _BYTE_IDS:
            pending.append(tid)
            continue
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
        if not 0 <= tid < VOCAB_SIZE:
            raise ValueError(f"token id {tid} is outside the vocabulary (0..{VOCAB_SIZE - 1})")
        if tid >= _SPECIAL_BASE and skip_special_tokens:
            continue
        out.append(_ID_TO_TEXT[tid])
    if pending:
        out.append(pending.decode("utf-8", errors="replace"))
    return "".join(out)


def token_str(tid: int) -> str:
    """The text of one token (bytes fall back to ``<0xNN>``, as HF tokenizers show them)."""
    if 0 <= tid < _BYTE_IDS:
        return f"<0x{tid:02X}>"
    return _ID_TO_TEXT[tid]


# Rendered chat messages: a system prompt or a document repeats across requests and is long, and
# exactly what prefix caching serves. The simulator renders on its event loop only.
MESSAGES = TokenCache(16 * MB)
MESSAGE_DOMAIN = b"m"  # the digest domain of one (role, content) message


def message_digest(role: str, content: str) -> int:
    """The cache key of one rendered message (the router keys its message cache the same way)."""
    return digest(MESSAGE_DOMAIN, (role, content))


def render_message(role: str, content: str) -> Tokens:
    """One message's tokens under the template, uncached (a plain function: it runs in workers)."""
    # Each message is tokenized on its own, so a conversation that grows by appending messages
    # keeps an identical token prefix: exactly the property prefix caching relies on.
    out = array("I", (START_HEADER_ID,))
    out.extend(encode(role))
    out.append(END_HEADER_ID)
    out.extend(encode("\n\n" + content))
    out.append(EOT_ID)
    return out


def _encode_message(role: str, content: str) -> Tokens:
    return MESSAGES.get(message_digest(role, content), lambda: render_message(role, content))


GENERATION_PROMPT: tuple[int, ...] = (START_HEADER_ID, *encode("assistant"), END_HEADER_ID, *encode("\n\n"))


def assemble_chat(rendered: Iterable[Sequence[int]], *, add_generation_prompt: bool = True) -> list[int]:
    """The prompt's ids from its messages' rendered tokens (:func:`render_message` of each)."""
    ids: list[int] = [BOS_ID]
    for part in rendered:
        ids.extend(part)
    if add_generation_prompt:
        ids.extend(GENERATION_PROMPT)
    return ids


def apply_chat_template(
    messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool = True
) -> list[int]:
    """Render ``(role, content)`` pairs with a fixed Llama-3-style template into token ids."""
    return assemble_chat(
        (_encode_message(role, content) for role, content in messages),
        add_generation_prompt=add_generation_prompt,
    )


def render_chat_text(messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool = True) -> str:
    """The chat template as text (what ``decode`` of :func:`apply_chat_template` shows with specials)."""
    return decode(
        apply_chat_template(messages, add_generation_prompt=add_generation_prompt), skip_special_tokens=False
    )
