"""Expected residency of a GPU prefix hit and where its evicted tail reloads from (pure; tables)."""

from __future__ import annotations

import pytest

from kvstack.router.residency import (
    TierTokens,
    TierWeights,
    expected_tiers,
    free_kv_tokens,
    has_kv_room,
    resident_by_recency,
    resident_fraction,
)


@pytest.mark.parametrize(
    ("ahead", "free", "expected"),
    [
        (0.0, 1000.0, 1.0),  # nothing queued ahead: the prefix is there when the request runs
        (0.0, 0.0, 1.0),  # ... even on a full engine: nothing will allocate before it
        (250.0, 1000.0, 0.75),  # a quarter of the free queue reallocated
        (1000.0, 1000.0, 0.0),  # the queue ahead takes every free block, the prefix among them
        (5000.0, 1000.0, 0.0),  # floored at 0
        (100.0, 0.0, 0.0),  # no free KV at all and work ahead: evicted
        (1e9, None, 1.0),  # not scraped yet: no discount (the index's view stands)
    ],
)
def test_resident_fraction(ahead: float, free: float | None, expected: float) -> None:
    assert resident_fraction(ahead, free) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("usage", "blocks", "block_size", "expected"),
    [
        (0.25, 1000, 16, 12_000.0),
        (1.0, 1000, 16, 0.0),
        (1.2, 1000, 16, 0.0),  # a scrape over 1 never reads as negative free KV
        (None, 1000, 16, None),  # not scraped
        (0.5, None, 16, None),  # block count unknown
        (0.5, 0, 16, None),
    ],
)
def test_free_kv_tokens(
    usage: float | None, blocks: int | None, block_size: int, expected: float | None
) -> None:
    assert free_kv_tokens(usage, blocks, block_size) == expected


@pytest.mark.parametrize(
    ("ahead", "free", "since", "prefix", "expected"),
    [
        # free queue of 10,000: 6,000 older blocks, the 1,000-token prefix, 3,000 freed after it
        (5_000.0, 10_000.0, 3_000.0, 1_000.0, 1.0),  # the queue ahead stops short of it
        (6_500.0, 10_000.0, 3_000.0, 1_000.0, 0.5),  # ... takes the prefix's tail half
        (8_000.0, 10_000.0, 3_000.0, 1_000.0, 0.0),  # ... takes all of it
        # freed just now (nothing behind it yet): the 9,000 older free tokens go first
        (8_000.0, 10_000.0, 0.0, 1_000.0, 1.0),
        # freed long ago: everything else is behind it, the first allocation takes it
        (500.0, 10_000.0, 1e9, 1_000.0, 0.5),
        (0.0, 10_000.0, 1e9, 1_000.0, 1.0),  # nothing queued ahead
        (500.0, None, 1e9, 1_000.0, 1.0),  # not scraped
    ],
)
def test_resident_by_recency(
    ahead: float, free: float | None, since: float, prefix: float, expected: float
) -> None:
    assert resident_by_recency(ahead, free, since, prefix) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("free", "ahead", "new", "expected"),
    [
        (10_000.0, 2_000.0, 3_000.0, True),
        (5_000.0, 2_000.0, 3_000.0, True),  # exactly enough
        (4_999.0, 2_000.0, 3_000.0, False),
        (0.0, 0.0, 0.0, True),  # a full hit behind nothing needs no new blocks
        (None, 1e9, 1e9, True),  # not scraped: assume room (no discount is ever gated on a guess)
    ],
)
def test_has_kv_room(free: float | None, ahead: float, new: float, expected: bool) -> None:
    assert has_kv_room(free, ahead, new) is expected


BS = 16


@pytest.mark.parametrize(
    ("gpu", "cpu_backed", "store_backed", "local", "reachable", "resident", "expected"),
    [
        # all resident: the index's tiers as they are
        (10, 10, 10, 12, 20, 1.0, TierTokens(gpu=160, cpu=32, shared=128)),
        # half the GPU prefix evicted, the CPU tier backs all of it: the tail reloads from CPU
        (10, 10, 10, 10, 10, 0.5, TierTokens(gpu=80, cpu=80, shared=0)),
        # ... the CPU tier backs only the first 6 blocks, Redis all 10: 1 from CPU, the last 4 from Redis
        (10, 6, 10, 10, 10, 0.5, TierTokens(gpu=80, cpu=16, shared=64)),
        # ... Redis holds no more than the CPU tier (no shared store): those 4 are recomputed
        (10, 6, 6, 10, 10, 0.5, TierTokens(gpu=80, cpu=16, shared=0)),
        # ... a partial last chunk (blocks 8-9) is stored nowhere: recomputed
        (10, 6, 8, 10, 10, 0.5, TierTokens(gpu=80, cpu=16, shared=32)),
        # all of it evicted: the CPU tier serves its copy, and its blocks past the GPU prefix still count
        (4, 4, 4, 8, 8, 0.0, TierTokens(gpu=0, cpu=128, shared=0)),
        # no GPU hit: residency changes nothing
        (0, 0, 0, 3, 5, 0.0, TierTokens(gpu=0, cpu=48, shared=32)),
    ],
)
def test_expected_tiers(
    gpu: int,
    cpu_backed: int,
    store_backed: int,
    local: int,
    reachable: int,
    resident: float,
    expected: TierTokens,
) -> None:
    got = expected_tiers(gpu, cpu_backed, store_backed, local, reachable, BS, resident)
    assert (got.gpu, got.cpu, got.shared) == pytest.approx((expected.gpu, expected.cpu, expected.shared))
    # tokens only move between tiers: what is lost is exactly the evicted blocks stored nowhere
    lost = (gpu - max(resident * gpu, min(store_backed, gpu))) * BS
    assert got.gpu + got.cpu + got.shared == pytest.approx(reachable * BS - max(0.0, lost))


@pytest.mark.parametrize(
    ("tiers", "weights", "expected"),
    [
        (TierTokens(gpu=100, cpu=100, shared=100), TierWeights(1.0, 0.94, 0.0), 194.0),
        (TierTokens(gpu=100), TierWeights(0.5, 0.94, 0.0), 50.0),
        (TierTokens(), TierWeights(), 0.0),
    ],
)
def test_weighted(tiers: TierTokens, weights: TierWeights, expected: float) -> None:
    assert tiers.weighted(weights) == pytest.approx(expected)
