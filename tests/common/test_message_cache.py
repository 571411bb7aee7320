"""The tokenizer's message cache: bounded by characters and entries, least recently used out."""

from __future__ import annotations

import pytest

from kvstack.common.tokenizer import MessageCache, apply_chat_template, assemble_chat, render_message


@pytest.mark.parametrize(
    ("max_chars", "max_entries", "sizes", "kept"),
    [
        (100, 10, [20, 20, 20], [0, 1, 2]),  # fits
        (100, 10, [25, 25, 25, 25, 25], [1, 2, 3, 4]),  # over the character budget: the oldest goes
        (100, 10, [25, 25, 25, 25, 20], [1, 2, 3, 4]),
        (1000, 2, [10, 10, 10], [1, 2]),  # over the entry bound
        (100, 10, [26], []),  # over a quarter of the budget: never cached
    ],
)
def test_bounds(max_chars: int, max_entries: int, sizes: list[int], kept: list[int]) -> None:
    cache = MessageCache(max_chars=max_chars, max_entries=max_entries)
    texts = [chr(ord("a") + i) * n for i, n in enumerate(sizes)]
    for i, text in enumerate(texts):
        cache.put("user", text, (i,))
    assert [i for i, t in enumerate(texts) if cache.get("user", t) is not None] == kept
    assert cache.chars == sum(len(texts[i]) for i in kept)
    assert cache.chars <= max_chars


def test_a_hit_is_most_recently_used() -> None:
    cache = MessageCache(max_chars=100, max_entries=2)
    cache.put("user", "a", (1,))
    cache.put("user", "b", (2,))
    assert cache.get("user", "a") == (1,)  # now b is the oldest
    cache.put("user", "c", (3,))
    assert (cache.get("user", "a"), cache.get("user", "b"), cache.get("user", "c")) == ((1,), None, (3,))


def test_role_is_part_of_the_key() -> None:
    cache = MessageCache()
    cache.put("system", "x", (1,))
    assert cache.get("user", "x") is None


def test_cached_and_uncached_templates_agree() -> None:
    msgs = [("system", "You are brief. " * 2000), ("user", "Hi")]  # 30K characters: cached now
    once, twice = apply_chat_template(msgs), apply_chat_template(msgs)
    assert once == twice == assemble_chat([render_message(r, c) for r, c in msgs])
    assert assemble_chat([], add_generation_prompt=False) == apply_chat_template(
        [], add_generation_prompt=False
    )
