"""vLLM 0.24's KV-event wire format (vllm/distributed/kv_events.py), shared by publisher and subscriber.

A ZMQ PUB message has three frames: topic, an 8-byte big-endian sequence number, and a msgpack
payload ``[ts, events, data_parallel_rank]``. Each event is a msgpack map tagged by ``"type"``;
only ``kv_cache_spec_sliding_window`` is omitted when unset, as in the reference capture. Fields
missing on decode take defaults and unknown fields are ignored, so older and newer engines decode.

Replay: a DEALER sends ``[b"", start_seq]`` to the engine's ROUTER socket and receives
``[b"", seq, payload]`` for each buffered batch with ``seq >= start_seq``, then
``[b"", REPLAY_END, b""]``.
"""

from __future__ import annotations

import struct

import msgspec

REPLAY_END: bytes = struct.pack(">q", -1)


class BlockStored(msgspec.Struct, tag="BlockStored", tag_field="type"):
    """Full blocks committed to the prefix cache; ``token_ids`` holds ``block_size`` tokens each."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = "GPU"
    lora_name: str | None = None
    extra_keys: list[object | None] | None = None
    group_idx: int | None = 0
    kv_cache_spec_kind: str | None = "full_attention"
    # vLLM omits this one when it is None (its only defaulted field); UNSET reproduces that.
    kv_cache_spec_sliding_window: int | msgspec.UnsetType | None = msgspec.UNSET


class BlockRemoved(msgspec.Struct, tag="BlockRemoved", tag_field="type"):
    """Blocks evicted from the prefix cache."""

    block_hashes: list[int]
    medium: str | None = "GPU"
    group_idx: int | None = 0


class AllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", tag_field="type"):
    """The whole prefix cache was reset."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, array_like=True):
    """One published message: the events of one engine step."""

    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(EventBatch)


def encode_batch(batch: EventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> EventBatch:
    """Decode a payload; raises ``msgspec.DecodeError`` on malformed input."""
    return _decoder.decode(payload)


def encode_seq(seq: int) -> bytes:
    return struct.pack(">q", seq)


def decode_seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise ValueError(f"sequence frame must be 8 bytes, got {len(frame)}")
    return int(struct.unpack(">q", frame)[0])
