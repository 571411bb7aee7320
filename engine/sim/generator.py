"""Deterministic generated tokens (pure).

Every generated token is one of 4096 " xyz"-style words (a space and three lowercase letters),
each a single token that the shared tokenizer reproduces exactly when the text is encoded again,
so a chat client that echoes the assistant's answer back hits the KV blocks of the answer.
Tokens depend only on the prompt and the position, so every pod answers a prompt alike.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence

import xxhash

from kvstack.common.tokenizer import EOT_ID, encode

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_WORD_BITS = 12


def _build_words() -> tuple[int, ...]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    ids: list[int] = []
    for i in range(1 << _WORD_BITS):
        word = " " + letters[i % 26] + letters[(i // 26) % 26] + letters[(i // 676) % 26]
        tok = encode(word)
        if len(tok) != 1:  # pragma: no cover - guards the tokenizer's contract
            raise RuntimeError(f"{word!r} is not a single token")
        ids.append(tok[0])
    return tuple(ids)


WORD_IDS: tuple[int, ...] = _build_words()
STOP_TOKEN_ID = EOT_ID  # a chat turn ends with <|eot_id|>, which the next turn's template echoes


def output_seed(prompt_token_ids: Sequence[int]) -> int:
    """A 64-bit seed for a request's output, from its prompt alone."""
    return int(xxhash.xxh3_64_intdigest(array("I", prompt_token_ids).tobytes()))


def token_at(seed: int, position: int) -> int:
    """The output token at ``position`` (0-based) of a request with ``seed``."""
    mixed = ((seed ^ (position * _GOLDEN)) * _GOLDEN) & _MASK64
    return WORD_IDS[mixed >> (64 - _WORD_BITS)]


def output_length(seed: int, max_tokens: int, mean: float | None, ignore_eos: bool) -> tuple[int, bool]:
    """How many tokens the request generates, and whether it ends on EOS ("stop").

    With a mean, the EOS position is exponential with that mean (at least 1), drawn from the seed.
    """
    if ignore_eos or mean is None:
        return max_tokens, False
    u = ((seed * _GOLDEN) & _MASK64) / 2.0**64  # in [0, 1)
    length = max(1, int(-mean * math.log1p(-u) + 0.5))
    if length >= max_tokens:
        return max_tokens, False
    return length, True
