"""Cutting a rendered chat at its added tokens, so that each piece's ids can be cached on their own.

HF ``tokenizers`` first cuts a text at its added (special) tokens and runs the normalizer,
pre-tokenizer and model on each piece on its own, so the ids of a chat are the ids of its pieces end
to end, when the tokenizer's settings guarantee it (:func:`piece_refusal` says why not otherwise).
:func:`chat_pieces` makes the cut; a :class:`ChatPlan` carries a chat's pieces, their cache keys and
the ids the cache held, from the event loop to the encoding and back (:mod:`.local_tokenizer`).
All pure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from kvstack.common.token_cache import Tokens

# Settings under which HF tokenizers encodes each piece between added tokens on its own, whatever
# comes before it: no normalizer or a Unicode one, and pre-tokenizers that ignore offsets (not
# Metaspace, whose prefix depends on where a piece starts).
PIECEWISE_NORMALIZERS = frozenset({"NFC", "NFD", "NFKC", "NFKD", "Sequence"})
PIECEWISE_PRE_TOKENIZERS = frozenset(
    {"ByteLevel", "Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit", "Sequence"}
)


def _nodes(node: Any, children: str) -> list[Mapping[str, Any]]:
    """A tokenizer.json component and those a ``Sequence`` of them holds."""
    if not isinstance(node, Mapping):
        return []
    found = [node]
    for child in node.get(children) or []:
        found += _nodes(child, children)
    return found


def pre_tokenizer_nodes(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A tokenizer.json's pre-tokenizer and those its ``Sequence`` holds."""
    return _nodes(spec.get("pre_tokenizer"), "pretokenizers")


def piece_refusal(spec: Mapping[str, Any]) -> str | None:
    """Why ``tokenizer.json``'s ids of a text might differ from its pieces' ids end to end (cut
    before each added token), or None when its settings make them equal by construction."""
    for t in spec.get("added_tokens") or []:
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            return f"added token {t.get('content')!r} strips or matches whole words"
        if t.get("normalized") and spec.get("normalizer") is not None:
            return f"added token {t.get('content')!r} is matched on normalized text"
    normalizers = _nodes(spec.get("normalizer"), "normalizers")
    odd = {str(n.get("type")) for n in normalizers} - PIECEWISE_NORMALIZERS
    if odd:
        return f"normalizer {sorted(odd)}"
    pre_tokenizers = pre_tokenizer_nodes(spec)
    odd = {str(n.get("type")) for n in pre_tokenizers} - PIECEWISE_PRE_TOKENIZERS
    if odd:
        return f"pre-tokenizer {sorted(odd)}"
    if any(n.get("add_prefix_space") for n in pre_tokenizers):
        return "a pre-tokenizer adds a prefix space"
    return None


def added_token_pattern(contents: Sequence[str]) -> re.Pattern[str] | None:
    """The added tokens as HF finds them in a text: leftmost first, the longest at one place."""
    ordered = sorted({c for c in contents if c}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


def chat_pieces(text: str, pattern: re.Pattern[str] | None) -> list[str]:
    """``text`` cut before each added token: every piece but the first starts with one."""
    if pattern is None:
        return [text] if text else []
    cuts = [0, *(m.start() for m in pattern.finditer(text) if m.start()), len(text)]
    return [text[a:b] for a, b in pairwise(cuts) if b > a]


@dataclass(slots=True)
class ChatPlan:
    """A rendered chat, its pieces, their cache keys and the ids the cache held (None: to encode).

    ``verify``: the text is also to be encoded whole, to compare with the pieces' ids joined.
    A piece cut in two after a start it shares with others (:mod:`.tokenizer_starts`, ``cut``) is its
    start (cached under its own key) and its rest; once the model's cuts are trusted the rest's key
    is the whole piece's, and ``rests`` maps the rest's index to its start's, so that the whole
    piece's ids are cached, not the rest's alone."""

    text: str
    pieces: list[str]
    keys: list[int]
    found: list[Tokens | None]
    verify: bool
    cut: bool = False  # a piece was cut after a shared start
    rests: dict[int, int] = field(default_factory=dict)

    def add(self, piece: str, key: int, found: Tokens | None, start: int | None = None) -> None:
        """Add a piece; ``start``: the index of the start it is the rest of (its key the whole's)."""
        if start is not None:
            self.rests[len(self.pieces)] = start
        self.pieces.append(piece)
        self.keys.append(key)
        self.found.append(found)

    def missing(self) -> list[str]:
        return [p for p, f in zip(self.pieces, self.found, strict=True) if f is None]

    def chars_to_encode(self) -> int:
        return sum(map(len, self.missing()))
