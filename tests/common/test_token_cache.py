"""The one token cache (bounded by bytes, least recently used out), its digest, and the tokenizer's
message cache built on it: pure, table-driven."""

from __future__ import annotations

import sys
from array import array

import pytest

from kvstack.common import tokenizer
from kvstack.common.token_cache import ENTRY_BYTES, TokenCache, as_tokens, digest, digest_of_digests
from kvstack.common.tokenizer import apply_chat_template, assemble_chat, render_message

B = ENTRY_BYTES + sys.getsizeof(array("I"))  # what an entry costs besides its 4 bytes per token


@pytest.mark.parametrize(
    ("max_bytes", "sizes", "kept"),
    [
        (16 * B, [10, 10, 10], [0, 1, 2]),  # fits
        (4 * B + 400, [25, 25, 25, 25, 25], [1, 2, 3, 4]),  # over the byte budget: the oldest goes
        (8 * B, [0] * 10, [2, 3, 4, 5, 6, 7, 8, 9]),  # empty entries still cost their overhead
        (4 * B + 400, [25], [0]),  # a quarter of the budget: kept
        (4 * B + 400, [26], []),  # over a quarter of the budget: handed back, never kept
    ],
)
def test_bounded_by_bytes(max_bytes: int, sizes: list[int], kept: list[int]) -> None:
    cache = TokenCache(max_bytes)
    for key, n in enumerate(sizes):
        assert list(cache.get(key, lambda n=n: [7] * n)) == [7] * n
    assert [key for key in range(len(sizes)) if key in cache] == kept
    assert cache.bytes == sum(4 * sizes[k] + B for k in kept) <= max_bytes
    assert (cache.hits, cache.misses) == (0, len(sizes))


def test_a_hit_is_most_recently_used_and_counted() -> None:
    cache = TokenCache(5 * (B + 4) - 1)  # four one-token entries fit, not five
    for key in (1, 2, 3, 4):
        cache.get(key, lambda key=key: [key])
    assert list(cache.get(1, lambda: [9])) == [1]  # a hit: 1 becomes the most recent
    cache.get(5, lambda: [5])  # evicts 2, the least recently used
    assert cache.find(2) is None and list(cache.find(1) or []) == [1]
    assert [key for key in (1, 2, 3, 4, 5) if key in cache] == [1, 3, 4, 5]
    assert (cache.hits, cache.misses) == (2, 5)


def test_put_keeps_the_first_array_and_hands_oversized_tokens_over_once() -> None:
    cache = TokenCache(4 * B + 400)  # entries of up to 25 tokens are kept
    first = cache.put(1, (1, 2, 3))
    assert cache.get(1, lambda: (9,)) is first  # uncounted: put() counted the miss
    assert cache.put(1, (1, 2, 3)) is first  # a concurrent twin: the cached array wins
    assert (cache.misses, cache.hits) == (1, 0)
    big = cache.put(2, tuple(range(26)))
    assert 2 not in cache
    assert cache.get(2, lambda: (9,)) is big
    assert list(cache.get(2, lambda: (9,))) == [9]  # not kept: made again next time


def test_a_budget_below_four_entries_is_refused() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        TokenCache(4 * B - 1)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ((b"m", ("user", "ab")), (b"m", ("usera", "b"))),  # the boundary moves: framing keeps them apart
        ((b"m", ("a",)), (b"m", ("a", ""))),
        ((b"m", ("x",)), (b"t", ("x",))),  # the domain is part of the digest
        ((b"m", ("é",)), (b"m", ("é".encode(),))),  # a text is hashed as its UTF-8 bytes
    ],
)
def test_digest_frames_its_parts(
    a: tuple[bytes, tuple[str | bytes, ...]], b: tuple[bytes, tuple[str | bytes, ...]]
) -> None:
    same = a[1] == b[1] or [p.encode() if isinstance(p, str) else p for p in a[1]] == list(b[1])
    assert (digest(*a) == digest(*b)) is (same and a[0] == b[0])
    assert 0 <= digest(*a) < 2**128


def test_digest_of_digests_is_ordered() -> None:
    x, y = digest(b"m", ("x",)), digest(b"m", ("y",))
    assert digest_of_digests(b"c", [x, y]) != digest_of_digests(b"c", [y, x]) != digest_of_digests(b"c", [x])


@pytest.mark.parametrize("ids", [[-1], [2**32], [10**30]])
def test_ids_a_uint32_array_cannot_hold_overflow(ids: list[int]) -> None:
    with pytest.raises(OverflowError):
        as_tokens(ids)
    tokens = as_tokens([0, 2**32 - 1])
    assert as_tokens(tokens) is tokens and tokens.typecode == "I"


def test_messages_are_keyed_by_role_and_content() -> None:
    assert tokenizer.message_digest("system", "x") != tokenizer.message_digest("user", "x")
    assert tokenizer.message_digest("user", "x") == digest(b"m", ("user", "x"))


def test_cached_and_uncached_templates_agree() -> None:
    msgs = [("system", "You are brief. " * 2000), ("user", "Hi")]  # 30K characters: cached now
    once, twice = apply_chat_template(msgs), apply_chat_template(msgs)
    assert once == twice == assemble_chat([render_message(r, c) for r, c in msgs])
    assert tokenizer.message_digest(*msgs[0]) in tokenizer.MESSAGES
    assert isinstance(render_message("user", "x"), array)
    assert assemble_chat([], add_generation_prompt=False) == apply_chat_template(
        [], add_generation_prompt=False
    )
