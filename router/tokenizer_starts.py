"""Long chat pieces that open with the same text: encode the shared start once, then each one's rest.

A system message often opens with text every conversation shares (an agent's instructions, a RAG
template) and ends with what is one user's own (a document, a name, today's date). Its piece is
then new for every user, and the router encoded all of it, shared part included: on multi-round
chat, a user's first turn encoded ~12,000 characters where the 4,000 of the shared system prompt
were known (issue #20, bench-results/router). :class:`SharedStarts` learns such starts by comparing
each long new piece with the last few, and cuts a piece after a start it knows, so only the rest is
encoded (the start's ids are cached like any piece's).

A cut is only made where HF tokenizers' pre-tokenizers split anyway, so that the start's ids and
the rest's, joined, are the whole piece's: after a letter and before a space that opens a word
(:func:`opens_word`). The GPT-2, Llama-3 and Qwen split patterns end a word at its last letter and
start the next pre-token at that space, and none of them joins a letter to the space after it, so
the text on each side is split as it is in the whole; the BPE model then works inside pre-tokens.
A pre-tokenizer that does not split there (``ByteLevel`` without its regex, alone) is refused
(:func:`start_refusal`), and the router checks its first cuts against the whole text
(:mod:`.local_tokenizer`). All pure, bar the bounded memory of starts and recent pieces.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

from kvstack.router.tokenizer_pieces import pre_tokenizer_nodes

LEARN_MIN_CHARS = 2048  # a shorter piece costs too little to encode to be worth comparing
SHARED_MIN_CHARS = 1024  # a shorter shared start is not kept
RECENT_PIECES = 16  # long new pieces kept to compare the next one with
KEPT_STARTS = 64  # starts kept per model, the oldest dropped first
HEAD_CHARS = 64  # the characters that index a start (a piece's header and first words)
CHUNK_CHARS = 256  # common starts are compared chunk by chunk: no copy longer than this
BACKOFF_CHARS = 512  # how far before the end of a common start a word boundary is looked for


def start_refusal(spec: Mapping[str, Any]) -> str | None:
    """Why a piece of ``tokenizer.json``'s model cannot be cut before a space-led word, or None when
    its pre-tokenizer splits there (a regex ``ByteLevel``, a ``Split`` or a whitespace splitter)."""
    for node in pre_tokenizer_nodes(spec):
        kind = node.get("type")
        if kind in ("Split", "Whitespace", "WhitespaceSplit"):
            return None
        if kind == "ByteLevel" and node.get("use_regex", True):
            return None
    return "no pre-tokenizer splits before a space-led word"


def opens_word(text: str, at: int) -> bool:
    """Whether ``text`` may be cut at ``at``: a letter before it, then a space and a letter."""
    return 0 < at < len(text) - 1 and text[at] == " " and text[at - 1].isalpha() and text[at + 1].isalpha()


def common_length(a: str, b: str) -> int:
    """How long ``a`` and ``b``'s common start is: compared a chunk of :data:`CHUNK_CHARS` at a
    time, then the first differing chunk halved down to the character (no copy longer than it)."""
    n = min(len(a), len(b))
    at = 0
    while at + CHUNK_CHARS <= n and a[at : at + CHUNK_CHARS] == b[at : at + CHUNK_CHARS]:
        at += CHUNK_CHARS
    lo, hi = at, min(at + CHUNK_CHARS, n)  # a[:lo] == b[:lo]; they differ before hi, or hi == n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def last_cut(text: str, end: int) -> int | None:
    """The last place at or before ``end`` that :func:`opens_word`, within :data:`BACKOFF_CHARS`."""
    at = text.rfind(" ", max(0, end - BACKOFF_CHARS), end + 1)
    while at > 0 and end - at <= BACKOFF_CHARS:
        if opens_word(text, at):
            return at
        at = text.rfind(" ", max(0, end - BACKOFF_CHARS), at)
    return None


class SharedStarts:
    """The starts one model's long pieces share, learnt from the pieces the router encodes."""

    def __init__(self) -> None:
        self._recent: deque[str] = deque(maxlen=RECENT_PIECES)
        self._starts: dict[str, list[str]] = {}  # by their first HEAD_CHARS, the longest first
        self._order: deque[str] = deque()  # the starts as kept, for dropping the oldest

    def __len__(self) -> int:
        return len(self._order)

    def split(self, piece: str) -> tuple[str, str] | None:
        """``piece`` cut after a start it shares with others (known, or learnt now from a recent
        piece), as (start, rest); None when there is none or the piece is too short."""
        if len(piece) < LEARN_MIN_CHARS:
            return None
        head = piece[:HEAD_CHARS]
        for start in self._starts.get(head, ()):
            if piece.startswith(start) and opens_word(piece, len(start)):
                return start, piece[len(start) :]
        if piece in self._recent:  # compared when it came first (a retry, or a start's tail)
            return None
        shared = max((common_length(piece, p) for p in self._recent if p.startswith(head)), default=0)
        self._recent.append(piece)
        at = last_cut(piece, shared) if shared >= SHARED_MIN_CHARS else None
        if at is None or at < SHARED_MIN_CHARS:
            return None
        self._keep(piece[:at])
        return piece[:at], piece[at:]

    def _keep(self, start: str) -> None:
        if len(self._order) >= KEPT_STARTS:
            old = self._order.popleft()
            self._starts[old[:HEAD_CHARS]].remove(old)
            if not self._starts[old[:HEAD_CHARS]]:
                del self._starts[old[:HEAD_CHARS]]
        same_head = self._starts.setdefault(start[:HEAD_CHARS], [])
        same_head.append(start)
        same_head.sort(key=len, reverse=True)
        self._order.append(start)
