"""The KV cache: prefix hits, vLLM's eviction order, pinning, hash chains, scoping, events."""

from __future__ import annotations

import pytest

from kvstack.common.blocks import block_keys, chain_root
from kvstack.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from kvstack.engine.sim.kv_cache import KVCache, block_extra_keys, engine_chain_root, extend_hashes

BS = 4


def hashes_of(
    tokens: list[int], root: int = 7, lora: str | None = None, salt: str | None = None
) -> list[int]:
    out: list[int] = []
    extend_hashes(out, tokens, len(tokens), BS, root, lora, salt)
    return out


def store(
    kv: KVCache, tokens: list[int], root: int = 7, lora: str | None = None, salt: str | None = None
) -> list[int]:
    """Allocate and commit all full blocks of ``tokens`` as one request; returns its block ids."""
    hs = hashes_of(tokens, root, lora, salt)
    blocks = kv.allocate(-(-len(tokens) // BS))
    kv.commit(blocks, hs, 0, len(hs), tokens, lora, salt)
    return blocks


@pytest.mark.parametrize(
    ("stored", "query", "hit_blocks"),
    [
        (list(range(12)), list(range(12)), 3),  # identical
        (list(range(12)), [*range(8), 99, 98, 97, 96], 2),  # diverges in block 3
        (list(range(12)), [99, *range(1, 12)], 0),  # diverges in block 1: nothing after counts
        (list(range(6)), list(range(6)), 1),  # the partial second block is never cached
        (list(range(3)), list(range(3)), 0),  # shorter than a block
        (list(range(8)), list(range(12)), 2),  # query longer than what is cached
    ],
)
def test_prefix_hits(stored: list[int], query: list[int], hit_blocks: int) -> None:
    kv = KVCache(16, BS)
    store(kv, stored)
    assert len(kv.find_prefix(hashes_of(query), 100)) == hit_blocks


def test_find_prefix_respects_max_blocks_and_disabled_caching() -> None:
    kv = KVCache(16, BS)
    store(kv, list(range(12)))
    assert len(kv.find_prefix(hashes_of(list(range(12))), 2)) == 2
    off = KVCache(16, BS, enable_prefix_caching=False)
    store(off, list(range(12)))
    assert off.find_prefix(hashes_of(list(range(12))), 100) == []
    assert off.take_events() == []


@pytest.mark.parametrize(
    ("index", "lora", "salt", "expected"),
    [
        (0, None, None, None),
        (3, None, None, None),
        (0, "sql-lora", None, ["sql-lora"]),
        (5, "sql-lora", None, ["sql-lora"]),
        (0, None, "tenant-a", ["tenant-a"]),
        (1, None, "tenant-a", None),  # the salt is on the first block only
        (0, "sql-lora", "tenant-a", ["sql-lora", "tenant-a"]),  # LoRA name first
        (2, "sql-lora", "tenant-a", ["sql-lora"]),
    ],
)
def test_block_extra_keys(index: int, lora: str | None, salt: str | None, expected: list[str] | None) -> None:
    assert block_extra_keys(index, lora, salt) == expected


# (seed, lora, salt) of the request that stored, then of the one that looks up
_A = (1, None, None)


@pytest.mark.parametrize(
    ("stored", "lookup", "shares"),
    [
        (_A, _A, True),
        (_A, (1, "sql-lora", None), False),
        ((1, "sql-lora", None), (1, "sql-lora", None), True),
        ((1, "sql-lora", None), (1, "other-lora", None), False),
        (_A, (1, None, "salt-a"), False),
        ((1, None, "salt-a"), (1, None, "salt-a"), True),
        ((1, None, "salt-a"), (1, None, "salt-b"), False),
        ((1, "sql-lora", "salt-a"), (1, "sql-lora", "salt-a"), True),
        ((1, "sql-lora", "salt-a"), (1, "sql-lora", None), False),
        (_A, (2, None, None), False),  # another process
    ],
)
def test_lora_salt_and_seed_scope_hits(
    stored: tuple[int, str | None, str | None], lookup: tuple[int, str | None, str | None], shares: bool
) -> None:
    kv = KVCache(16, BS)
    tokens = list(range(8))
    seed, lora, salt = stored
    store(kv, tokens, engine_chain_root(seed), lora, salt)
    seed, lora, salt = lookup
    hit = kv.find_prefix(hashes_of(tokens, engine_chain_root(seed), lora, salt), 100)
    assert len(hit) == (2 if shares else 0)


def test_extra_keys_change_every_block_hash() -> None:
    tokens = list(range(12))
    plain = hashes_of(tokens)
    for lora, salt in (("sql-lora", None), (None, "s"), ("sql-lora", "s")):
        assert not set(hashes_of(tokens, lora=lora, salt=salt)) & set(plain)
    # extra keys are encoded unambiguously: two keys never read as one that contains a separator
    assert hashes_of(tokens, lora="a", salt="b") != hashes_of(tokens, lora="a\x00b")


def test_hash_chain_covers_the_parent() -> None:
    # The same block content after different prefixes must hash differently.
    a = hashes_of([1, 2, 3, 4, 9, 9, 9, 9])
    b = hashes_of([5, 6, 7, 8, 9, 9, 9, 9])
    assert a[1] != b[1]
    assert hashes_of([1, 2, 3, 4]) == a[:1]
    assert all(0 <= h < 2**64 for h in a + b)


@pytest.mark.parametrize(("lora", "salt"), [(None, None), ("sql-lora", None), (None, "s"), ("sql-lora", "s")])
def test_extend_hashes_is_incremental(lora: str | None, salt: str | None) -> None:
    tokens = list(range(20))
    grown: list[int] = []
    for n in range(len(tokens) + 1):
        extend_hashes(grown, tokens, n, BS, 7, lora, salt)
    assert grown == hashes_of(tokens, 7, lora, salt)


def test_engine_hashes_are_not_the_router_keys() -> None:
    tokens = list(range(64))
    router = block_keys(tokens, 16, chain_root("m"))
    engine: list[int] = []
    extend_hashes(engine, tokens, 64, 16, engine_chain_root(0))
    assert len(engine) == len(router) == 4
    assert not set(engine) & set(router)


def test_free_order_evicts_the_tail_of_a_sequence_first() -> None:
    kv = KVCache(6, BS)
    a = store(kv, list(range(12)))  # blocks 0, 1, 2
    assert a == [0, 1, 2]
    kv.free(a)
    # Never-used blocks first, then the tail of the freed sequence before its head.
    assert kv.free_order() == [3, 4, 5, 2, 1, 0]
    kv.take_events()
    kv.allocate(4)
    (removed,) = kv.take_events()
    assert isinstance(removed, BlockRemoved)
    assert removed.block_hashes == [hashes_of(list(range(12)))[2]]
    # The head of the prefix still hits; the evicted tail does not.
    assert len(kv.find_prefix(hashes_of(list(range(12))), 100)) == 2


def test_allocation_takes_the_least_recently_freed() -> None:
    kv = KVCache(4, BS)
    a = kv.allocate(2)
    b = kv.allocate(2)
    kv.free(b)
    kv.free(a)
    assert kv.allocate(1) == [b[1]]


def test_running_blocks_are_pinned() -> None:
    kv = KVCache(4, BS)
    held = store(kv, list(range(12)))
    assert kv.can_allocate((), 1)
    assert not kv.can_allocate((), 2)
    got = kv.allocate(1)
    assert got == [3] and not set(got) & set(held)
    assert kv.num_free == 0
    assert all(kv.ref_count(b) == 1 for b in held)


def test_a_cached_free_block_can_be_hit_and_leaves_the_free_queue() -> None:
    kv = KVCache(4, BS)
    blocks = store(kv, list(range(8)))
    kv.free(blocks)
    assert kv.usage == 0.0  # cached-but-free blocks do not count as used
    hit = kv.find_prefix(hashes_of(list(range(8))), 100)
    assert hit == blocks
    assert kv.can_allocate(hit, 2)
    assert not kv.can_allocate(hit, 3)  # touching them makes them unavailable for fresh blocks
    kv.touch(hit)
    assert kv.free_order() == [2, 3]
    assert kv.usage == pytest.approx(0.5)
    kv.touch(hit)  # a second request shares them
    assert [kv.ref_count(b) for b in hit] == [2, 2]
    kv.free(hit)
    assert kv.num_used == 2


@pytest.mark.parametrize(
    ("lora", "salt", "extra_keys"),
    [
        (None, None, [None, None, None]),
        ("sql-lora", None, [["sql-lora"], ["sql-lora"], ["sql-lora"]]),
        (None, "tenant-a", [["tenant-a"], None, None]),
        ("sql-lora", "tenant-a", [["sql-lora", "tenant-a"], ["sql-lora"], ["sql-lora"]]),
    ],
)
def test_block_stored_event_fields(
    lora: str | None, salt: str | None, extra_keys: list[object | None]
) -> None:
    kv = KVCache(8, BS)
    tokens = list(range(100, 112))
    hs = hashes_of(tokens, 7, lora, salt)
    blocks = kv.allocate(3)
    kv.commit(blocks, hs, 0, 2, tokens, lora, salt)
    kv.commit(blocks, hs, 2, 3, tokens, lora, salt)
    first, second = kv.take_events()
    assert first == BlockStored(
        block_hashes=hs[:2],
        parent_block_hash=None,
        token_ids=tokens[:8],
        block_size=BS,
        lora_id=None,
        medium="GPU",
        lora_name=lora,
        extra_keys=extra_keys[:2],
        group_idx=0,
        kv_cache_spec_kind="full_attention",
    )
    assert second == BlockStored(
        block_hashes=hs[2:],
        parent_block_hash=hs[1],
        token_ids=tokens[8:],
        block_size=BS,
        lora_id=None,
        medium="GPU",
        lora_name=lora,
        extra_keys=extra_keys[2:],
        group_idx=0,
        kv_cache_spec_kind="full_attention",
    )
    assert kv.take_events() == []


def test_duplicate_content_is_cached_once() -> None:
    kv = KVCache(8, BS)
    tokens = list(range(8))
    store(kv, tokens)
    kv.take_events()
    store(kv, tokens)  # computed again by a request that started before the first committed
    assert kv.take_events() == []
    assert kv.num_cached == 2


def test_reset_refuses_while_blocks_are_in_use_then_clears() -> None:
    kv = KVCache(8, BS)
    blocks = store(kv, list(range(8)))
    kv.take_events()
    assert kv.reset() is False
    assert kv.take_events() == []
    kv.free(blocks)
    assert kv.reset() is True
    assert kv.take_events() == [AllBlocksCleared()]
    assert kv.num_cached == 0
    assert kv.find_prefix(hashes_of(list(range(8))), 100) == []
    # Reused blocks were cleared silently: no BlockRemoved after AllBlocksCleared.
    kv.allocate(8)
    assert kv.take_events() == []
