"""The KV-block index: events in, longest prefixes out (pure; table-driven)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest

from kvstack.common.blocks import block_keys, chain_root
from kvstack.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvstack.common.tokenizer import encode
from kvstack.router.kvindex.index import IndexSettings, KVIndex, PrefixMatch

MODEL = "m"
BS = 16
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 8
TOKENS = encode(TEXT)[: 8 * BS]  # exactly 8 blocks
assert len(TOKENS) == 8 * BS

_hashes = itertools.count(1000)


def ehashes(n: int) -> list[int]:
    """Engine-side hashes: arbitrary numbers, unrelated to ours (as vLLM's seeded hashes are)."""
    return [next(_hashes) for _ in range(n)]


def stored(
    tokens: Sequence[int],
    hashes: list[int],
    parent: int | None = None,
    *,
    bs: int = BS,
    medium: str = "GPU",
    lora: str | None = None,
    extra_keys: list[object | None] | None = None,
) -> BlockStored:
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=list(tokens),
        block_size=bs,
        medium=medium,
        lora_name=lora,
        extra_keys=extra_keys,
    )


def keys_of(tokens: Sequence[int], *, lora: str | None = None, salt: str | None = None) -> list[int]:
    return block_keys(tokens, BS, chain_root(MODEL, lora, salt))


def index_with(*engines: str, settings: IndexSettings | None = None, **kw: object) -> KVIndex:
    idx = KVIndex(settings)
    for e in engines:
        idx.ensure_engine(e, model=MODEL, block_size=BS, **kw)  # type: ignore[arg-type]
    return idx


def gpu(idx: KVIndex, engine: str, tokens: Sequence[int] = TOKENS, now: float = 0.0) -> int:
    return idx.match(engine, keys_of(tokens), now).gpu_blocks


H = ehashes(8)  # one engine's hashes for TOKENS' 8 blocks


def blocks(lo: int, hi: int) -> list[int]:
    return TOKENS[lo * BS : hi * BS]


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        pytest.param([stored(TOKENS, H)], 8, id="one-event-all-blocks"),
        pytest.param([stored(blocks(0, 3), H[:3])], 3, id="partial-prefix"),
        pytest.param([stored(blocks(0, 3), H[:3]), stored(blocks(3, 8), H[3:], H[2])], 8, id="parent-chain"),
        pytest.param([stored(blocks(3, 8), H[3:], H[2]), stored(blocks(0, 3), H[:3])], 8, id="out-of-order"),
        pytest.param([stored(blocks(3, 8), H[3:], H[2])], 0, id="parent-never-arrives"),
        pytest.param([stored(TOKENS, H), BlockRemoved(block_hashes=H[5:])], 5, id="remove-tail"),
        pytest.param([stored(TOKENS, H), BlockRemoved(block_hashes=H)], 0, id="remove-all"),
        pytest.param([stored(TOKENS, H), AllBlocksCleared()], 0, id="cleared"),
        pytest.param([stored(TOKENS, H), AllBlocksCleared(), stored(blocks(0, 2), H[:2])], 2, id="refill"),
        pytest.param([stored(TOKENS, H), BlockRemoved(block_hashes=[1, 2, 3])], 8, id="remove-unknown"),
        pytest.param([stored(TOKENS[:-1], H)], 0, id="malformed-token-count"),
        pytest.param(
            [stored(blocks(0, 1), H[:1], extra_keys=[["salt-a"]])], 0, id="salted-block-needs-salted-request"
        ),
        pytest.param([stored(blocks(0, 1), H[:1], lora="ad")], 0, id="lora-block-needs-lora-request"),
        pytest.param([stored(TOKENS, H, medium="cpu")], 0, id="cpu-tier-is-not-gpu"),
    ],
)
def test_events_to_gpu_prefix(events: list[KVEvent], expected: int) -> None:
    idx = index_with("a", "b")
    idx.apply("a", events)
    assert gpu(idx, "a") == expected
    assert gpu(idx, "b") == 0  # nothing leaks to another engine


def test_engine_hashes_are_never_trusted_across_engines() -> None:
    idx = index_with("a", "b")
    idx.apply("a", [stored(TOKENS, ehashes(8))])
    idx.apply("b", [stored(blocks(0, 4), ehashes(4))])  # another process, another hash seed
    assert (gpu(idx, "a"), gpu(idx, "b")) == (8, 4)


@pytest.mark.parametrize(
    ("lora", "salt", "extra_keys"),
    [("ad", None, None), (None, "s1", [["s1"], None]), ("ad", "s1", [["ad", "s1"]])],
)
def test_scope_follows_lora_and_salt(lora: str | None, salt: str | None, extra_keys: list[object]) -> None:
    idx = index_with("a")
    idx.apply("a", [stored(blocks(0, 2), ehashes(2), lora=lora, extra_keys=extra_keys)])
    assert idx.match("a", keys_of(TOKENS, lora=lora, salt=salt), 0).gpu_blocks == 2
    assert gpu(idx, "a") == 0


def test_longer_and_diverging_requests_match_the_shared_prefix() -> None:
    idx = index_with("a")
    idx.apply("a", [stored(blocks(0, 4), H[:4])])
    diverging = blocks(0, 3) + [t + 1 for t in blocks(3, 8)]
    assert gpu(idx, "a", TOKENS + TOKENS) == 4
    assert gpu(idx, "a", diverging) == 3
    assert gpu(idx, "a", [*blocks(0, 2), 1, 2, 3]) == 2  # a trailing partial block never counts


def test_restart_and_removal_leave_nothing_behind() -> None:
    idx = index_with("a", "b")
    for e in ("a", "b"):
        idx.apply(e, [stored(TOKENS, ehashes(8)), stored(TOKENS, ehashes(8), medium="cpu")])
    idx.reset_engine("a")
    assert idx.match("a", keys_of(TOKENS), 0) == PrefixMatch(BS, 0, 0, 8)  # only the shared store
    idx.remove_engine("b")
    assert idx.match("b", keys_of(TOKENS), 0) == PrefixMatch(BS)
    assert "b" not in idx.engines()


def test_clear_keeps_the_engines_cpu_tier() -> None:
    idx = index_with("a")
    idx.apply("a", [stored(TOKENS, ehashes(8)), stored(blocks(0, 4), ehashes(4), medium="cpu")])
    idx.apply("a", [AllBlocksCleared()])
    assert idx.match("a", keys_of(TOKENS), 0) == PrefixMatch(BS, 0, 4, 4)


@pytest.mark.parametrize(
    ("weights", "expected_hit_tokens"),
    [
        ({}, (4 * 1.0 + 2 * 0.94 + 2 * 0.0) * BS),  # the measured defaults: Redis is worth nothing
        ({"cpu_weight": 0.5, "shared_weight": 0.25}, (4 + 2 * 0.5 + 2 * 0.25) * BS),
        ({"gpu_weight": 0.5, "cpu_weight": 0.0, "shared_weight": 0.0}, 4 * 0.5 * BS),
    ],
)
def test_tier_weights(weights: dict[str, float], expected_hit_tokens: float) -> None:
    settings = IndexSettings(**weights)  # type: ignore[arg-type]
    idx = index_with("a", "b", settings=settings)
    # b computed all 8 blocks and LMCache offloaded them (to its CPU and the shared store);
    # a holds 4 on its GPU and 6 in its own CPU tier
    idx.apply("b", [stored(TOKENS, ehashes(8), medium="cpu")])
    idx.apply("a", [stored(blocks(0, 4), ehashes(4)), stored(blocks(0, 6), ehashes(6), medium="cpu")])
    m = idx.match("a", keys_of(TOKENS), 0)
    assert (m.gpu_blocks, m.local_blocks, m.reachable_blocks) == (4, 6, 8)
    assert m.hit_tokens(settings) == pytest.approx(expected_hit_tokens)
    # the policy's allocation-free path agrees with the match, on every engine and prefix length
    for engine in ("a", "b", "unknown"):
        for n in range(0, 9, 3):
            keys = keys_of(TOKENS)[:n]
            assert idx.hit_tokens(engine, keys, 0) == idx.match(engine, keys, 0).hit_tokens(settings)


def test_without_a_shared_store_cpu_blocks_stay_local() -> None:
    idx = index_with("a", "b", settings=IndexSettings(shared_store=False))
    idx.apply("b", [stored(TOKENS, ehashes(8), medium="cpu")])
    assert idx.match("a", keys_of(TOKENS), 0) == PrefixMatch(BS)
    assert idx.match("b", keys_of(TOKENS), 0) == PrefixMatch(BS, 0, 8, 8)


@pytest.mark.parametrize(
    ("settings", "reachable_on_a"),
    [
        (IndexSettings(), 0),  # the engines' LMCache tiers send no events: a knows nothing of b's
        (IndexSettings(shared_store_from_gpu=True), 8),  # b's GPU stores went through to Redis
        (IndexSettings(shared_store_from_gpu=True, shared_store=False), 0),  # no store to go through
    ],
)
def test_gpu_blocks_count_as_in_the_shared_store_when_lmcache_writes_through(
    settings: IndexSettings, reachable_on_a: int
) -> None:
    idx = index_with("a", "b", settings=settings)
    idx.apply("b", [stored(TOKENS, ehashes(8))])
    assert idx.match("a", keys_of(TOKENS), 0) == PrefixMatch(BS, 0, 0, reachable_on_a)
    assert idx.match("b", keys_of(TOKENS), 0) == PrefixMatch(BS, 8, 8, 8)
    idx.apply("b", [BlockRemoved(block_hashes=ehashes(8))])  # evicted from b's GPU, still in Redis
    assert idx.match("a", keys_of(TOKENS), 0).reachable_blocks == reachable_on_a


def test_lmcache_chunks_cover_many_blocks() -> None:
    chunk = 4 * BS  # LMCache chunks are 256 tokens; here 4 blocks, the same 1:many shape
    idx = index_with("a")
    c = ehashes(2)
    idx.apply("a", [stored(TOKENS[:chunk], c[:1], bs=chunk, medium="cpu")])
    idx.apply("a", [stored(TOKENS[chunk:], c[1:], c[0], bs=chunk, medium="cpu")])
    assert idx.match("a", keys_of(TOKENS), 0).local_blocks == 8
    idx.apply("a", [BlockRemoved(block_hashes=c[1:], medium="cpu")])
    assert idx.match("a", keys_of(TOKENS), 0).local_blocks == 4


def test_gpu_events_set_the_block_size() -> None:
    idx = index_with("a")
    idx.apply("a", [stored(TOKENS, ehashes(4), bs=32)])
    assert idx.block_size("a") == 32
    assert idx.match("a", block_keys(TOKENS, 32, chain_root(MODEL)), 0).gpu_blocks == 4
    idx.ensure_engine("a", block_size=16)  # a scrape no longer overrides what events said
    assert idx.block_size("a") == 32


@pytest.mark.parametrize(
    ("confirm", "at", "expected"),
    [
        (False, 0.5, 8),  # speculative entry live
        (False, 2.5, 0),  # expired
        (True, 2.5, 8),  # confirmed by an event before expiry
    ],
)
def test_speculative_entries(confirm: bool, at: float, expected: int) -> None:
    idx = index_with("a", settings=IndexSettings(speculative_ttl_s=2.0))
    idx.record_dispatch("a", keys_of(TOKENS), now=0.0)
    assert idx.speculative_blocks == 8
    if confirm:
        idx.apply("a", [stored(TOKENS, ehashes(8))])
        assert idx.speculative_blocks == 0
    assert gpu(idx, "a", now=at) == expected


@pytest.mark.parametrize(
    ("confirmed", "dispatched", "speculative"),
    [
        (0, 8, 8),  # nothing confirmed: every block is speculative
        (5, 8, 3),  # a confirmed prefix of 5: only the tail is written
        (8, 8, 0),  # a full repeat writes nothing
        (8, 4, 0),
    ],
)
def test_speculation_skips_the_confirmed_prefix(confirmed: int, dispatched: int, speculative: int) -> None:
    idx = index_with("a")
    if confirmed:
        idx.apply("a", [stored(TOKENS[: confirmed * BS], ehashes(confirmed))])
    idx.record_dispatch("a", keys_of(TOKENS[: dispatched * BS]), now=0.0)
    assert idx.speculative_blocks == speculative
    assert gpu(idx, "a", TOKENS[: dispatched * BS], now=1.0) == dispatched


def test_speculative_entries_are_bounded() -> None:
    idx = index_with("a", num_gpu_blocks=40, settings=IndexSettings(capacity_slack=1.0))
    for i in range(100):
        idx.record_dispatch("a", keys_of([i] * 4 * BS), now=float(i) * 0.001)
    assert idx.speculative_blocks <= 40


def test_approximate_lru_for_engines_without_events() -> None:
    idx = index_with("a", events=False, num_gpu_blocks=36, settings=IndexSettings(capacity_slack=1.0))
    prompts = [[i] * 8 * BS for i in range(10)]  # 8 blocks each, 80 in all
    for p in prompts:
        idx.record_dispatch("a", keys_of(p), now=0.0)
    assert idx.indexed_blocks == 36
    assert [gpu(idx, "a", p) for p in prompts] == [0] * 5 + [4] + [8] * 4
    # the partly evicted prompt lost its tail, not its root: still a usable prefix
    idx.record_dispatch("a", keys_of(prompts[0]), now=0.0)  # a repeat refreshes it
    assert gpu(idx, "a", prompts[0]) == 8


def test_unique_prompts_never_grow_the_index_past_its_cap() -> None:
    cap = 64
    idx = index_with("a", "b", num_gpu_blocks=cap, settings=IndexSettings(capacity_slack=1.0))
    for i in range(500):  # an engine whose BlockRemoved events we never saw
        idx.apply("a", [stored([i] * 4 * BS, ehashes(4))])
        idx.apply("b", [stored([i] * 4 * BS, ehashes(4), medium="cpu")])
    assert idx.indexed_blocks <= 2 * 2 * cap + idx.settings.shared_capacity_blocks
    assert len(idx._engines["a"].held[0]) <= cap
    assert len(idx._engines["b"].held[1]) <= cap
    assert idx.counters.evicted_at_cap > 0
    assert gpu(idx, "a", [499] * 4 * BS) == 4


def test_orphans_are_bounded() -> None:
    idx = index_with("a", settings=IndexSettings(max_orphans_per_engine=3))
    for _ in range(5):
        idx.apply("a", [stored(blocks(1, 2), ehashes(1), parent=next(_hashes))])
    assert idx.counters.orphans_dropped == 2


def test_unknown_engine_and_missing_model_are_skipped() -> None:
    idx = KVIndex()
    idx.apply("nobody", [stored(TOKENS, ehashes(8))])
    idx.ensure_engine("a")  # model not yet known
    idx.apply("a", [stored(TOKENS, ehashes(8))])
    assert idx.counters.skipped_events == 2
    assert idx.indexed_blocks == 0


@pytest.mark.parametrize(
    ("shared_store", "upto", "expected"),
    [
        (True, 8, (4, 6)),  # a's CPU tier holds 4 blocks; b's chunks put 6 in the shared store
        (True, 3, (3, 3)),  # only the first ``upto`` blocks are asked about
        (True, 0, (0, 0)),
        (False, 8, (4, 4)),  # no shared store: only a's own CPU tier backs its GPU blocks
    ],
)
def test_backed_blocks(shared_store: bool, upto: int, expected: tuple[int, int]) -> None:
    """Where an engine's GPU blocks would reload from once evicted: its CPU tier, else the store."""
    idx = index_with("a", "b", settings=IndexSettings(shared_store=shared_store))
    idx.apply("a", [stored(TOKENS, ehashes(8)), stored(blocks(0, 4), ehashes(4), medium="cpu")])
    idx.apply("b", [stored(blocks(0, 6), ehashes(6), medium="cpu")])
    assert idx.backed_blocks("a", keys_of(TOKENS), upto) == expected
    assert idx.backed_blocks("unknown", keys_of(TOKENS), upto) == (0, 0)
