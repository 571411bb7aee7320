"""The block-key cache: always the keys ``block_keys`` computes, hashing only what it must."""

from __future__ import annotations

import random

import pytest

from kvstack.common.blocks import block_keys, chain_root
from kvstack.router.kvindex.keys import KeyCache

ROOT = chain_root("m")
rng = random.Random(7)
SYSTEM = tuple(rng.randrange(128_000) for _ in range(1000))  # 62 blocks of 16 and 8 tokens over


def tail(n: int, seed: int) -> tuple[int, ...]:
    r = random.Random(seed)
    return tuple(r.randrange(128_000) for _ in range(n))


# (name, prompts in order, block size, checkpoint every, blocks hashed for the last prompt)
CASES = [
    ("cold prompt", [SYSTEM + tail(40, 1)], 16, 16, 65),
    ("same text, new object", [SYSTEM + tail(40, 1), SYSTEM + tail(40, 1)], 16, 16, 0),
    # the deepest checkpoint inside the shared 62 blocks is at 48: 65 - 48 blocks hashed
    ("shared system prompt", [SYSTEM + tail(40, 1), SYSTEM + tail(40, 2)], 16, 16, 17),
    ("finer checkpoints", [SYSTEM + tail(40, 1), SYSTEM + tail(40, 2)], 16, 4, 5),
    # checkpoints sit at multiples of 16 blocks (and each prompt's end): 48 is the deepest shared
    ("chat grows by a turn", [SYSTEM, SYSTEM + tail(300, 3)], 16, 16, 81 - 48),
    ("prefix of a known prompt", [SYSTEM + tail(300, 3), SYSTEM[:500]], 16, 16, 31 - 16),
    ("block size 32", [SYSTEM + tail(40, 1), SYSTEM + tail(40, 2)], 32, 16, 32 - 16),
    ("differs in block 0", [SYSTEM, (1, *SYSTEM[1:])], 16, 16, 62),
    ("shorter than a block", [SYSTEM[:10]], 16, 16, 0),
    ("empty", [()], 16, 16, 0),
]


@pytest.mark.parametrize(
    ("prompts", "block_size", "every", "hashed_last"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_keys_equal_block_keys_and_reuse_checkpoints(
    prompts: list[tuple[int, ...]], block_size: int, every: int, hashed_last: int
) -> None:
    cache = KeyCache(checkpoint_blocks=every)
    before = 0
    for tokens in prompts:
        before = cache.hashed_blocks
        # a list: never the object a previous call cached by identity
        assert list(cache.keys(list(tokens), block_size, ROOT)) == block_keys(tokens, block_size, ROOT)
    assert cache.hashed_blocks - before == hashed_last


def test_identity_hits_and_scope() -> None:
    cache = KeyCache()
    tokens = SYSTEM + tail(40, 1)
    first = cache.keys(tokens, 16, ROOT)
    assert cache.keys(tokens, 16, ROOT) is first  # the same object: no digest at all
    assert (cache.hits, cache.misses) == (1, 1)
    other_root = chain_root("m", "lora-a")
    assert list(cache.keys(tokens, 16, other_root)) == block_keys(tokens, 16, other_root)
    assert cache.misses == 2  # another scope shares nothing, checkpoints included
    assert list(cache.keys(tokens, 32, ROOT)) == block_keys(tokens, 32, ROOT)
    assert cache.misses == 3  # nor does another block size


def test_memory_is_bounded_by_bytes() -> None:
    cache = KeyCache(max_bytes=64 * 1024, checkpoint_blocks=1)
    for seed in range(200):
        tokens = tail(160, seed)
        assert list(cache.keys(tokens, 16, ROOT)) == block_keys(tokens, 16, ROOT)
        assert cache.bytes <= cache.max_bytes
    assert 0 < cache.identity_entries() < 200 and len(cache) > 0  # both halves keep something


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="64 KiB"):
        KeyCache(max_bytes=1000)
    with pytest.raises(ValueError, match="positive"):
        KeyCache(checkpoint_blocks=0)
