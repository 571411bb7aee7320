import json
from pathlib import Path

import msgspec
import pytest

from kvstack.common import kv_events
from kvstack.common.blocks import block_keys, chain_root, extend_keys


@pytest.mark.parametrize(
    ("n_tokens", "block_size", "expected_blocks"),
    [(0, 16, 0), (15, 16, 0), (16, 16, 1), (33, 16, 2), (64, 64, 1), (100, 10, 10)],
)
def test_only_full_blocks_have_keys(n_tokens: int, block_size: int, expected_blocks: int) -> None:
    assert len(block_keys(list(range(n_tokens)), block_size, 7)) == expected_blocks


def test_keys_chain_prefixes() -> None:
    root = chain_root("m")
    a = block_keys(list(range(64)), 16, root)
    b = block_keys([*range(48), 999, *range(49, 64)], 16, root)
    assert a[:3] == b[:3] and a[3] != b[3]
    assert extend_keys(a[1], list(range(32, 64)), 16) == a[2:]


def test_scope_separates_models_adapters_and_salts() -> None:
    roots = {chain_root("m"), chain_root("m2"), chain_root("m", "lora"), chain_root("m", None, "salt")}
    assert len(roots) == 4


def test_max_blocks_and_bad_block_size() -> None:
    assert len(block_keys(list(range(160)), 16, 1, max_blocks=3)) == 3
    with pytest.raises(ValueError):
        block_keys([1], 0, 1)


def test_reference_kv_events_round_trip_byte_exact(reference_dir: Path) -> None:
    sample = json.loads((reference_dir / "vllm-0.24-kv-events-sample.json").read_text())
    for message in sample:
        ts, events, dp_rank = message["payload_decoded"]
        raw = msgspec.msgpack.encode([ts, events, dp_rank])
        batch = kv_events.decode_batch(raw)
        stored = batch.events[0]
        assert isinstance(stored, kv_events.BlockStored)
        assert len(stored.token_ids) == stored.block_size * len(stored.block_hashes)
        assert kv_events.encode_batch(batch) == raw


def test_events_decode_with_unknown_and_missing_fields() -> None:
    raw = msgspec.msgpack.encode(
        [
            1.0,
            [
                {"type": "BlockRemoved", "block_hashes": [1, 2], "future_field": 3},
                {"type": "AllBlocksCleared"},
            ],
            None,
        ]
    )
    batch = kv_events.decode_batch(raw)
    assert isinstance(batch.events[0], kv_events.BlockRemoved)
    assert batch.events[0].medium == "GPU"
    assert isinstance(batch.events[1], kv_events.AllBlocksCleared)


def test_seq_frames() -> None:
    assert kv_events.decode_seq(kv_events.encode_seq(5)) == 5
    assert kv_events.encode_seq(-1) == kv_events.REPLAY_END
    with pytest.raises(ValueError):
        kv_events.decode_seq(b"\x00")
