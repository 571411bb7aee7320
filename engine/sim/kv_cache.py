"""Paged KV blocks with vLLM V1's prefix cache and eviction rules (pure, no asyncio).

* A block is pinned while any request holds it (``ref_cnt > 0``).
* A request frees its blocks tail first, so the end of a sequence is evicted before its start;
  allocation takes the least recently freed block.
* A freed block keeps its hash and can still be hit; a hit takes it out of the free queue.
* Reusing a cached block for new content evicts it: one ``BlockRemoved`` event.
* Full blocks are committed with one ``BlockStored`` event per request and step.

Block hashes chain over the parent hash, the block's tokens and its extra keys (the LoRA name on
every block, the cache salt on the first), seeded per process (vLLM's NONE_HASH), so they never
equal the router's keys (:mod:`kvstack.common.blocks`). The events carry the same extra keys.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence

import msgspec
import xxhash

from kvstack.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

_encode_keys = msgspec.msgpack.Encoder().encode


def engine_chain_root(seed: int) -> int:
    """NONE_HASH, the parent of every request's first block: per process unless the seed is shared."""
    return int(xxhash.xxh3_64_intdigest(f"vllm-none-hash\x00{seed}".encode()))


def block_extra_keys(index: int, lora_name: str | None, cache_salt: str | None) -> list[str] | None:
    """vLLM's extra keys of block ``index``: LoRA name, then cache salt on block 0; None if neither."""
    keys = [lora_name] if lora_name else []
    if index == 0 and cache_salt:
        keys.append(cache_salt)
    return keys or None


def _extra_bytes(keys: list[str] | None) -> bytes:
    # Token bytes have a fixed length per block, so any non-empty suffix keeps blocks with and
    # without extra keys apart; msgpack keeps ("a", "b") apart from ("a\x00b",).
    return _encode_keys(keys) if keys else b""


def extend_hashes(
    hashes: list[int],
    tokens: Sequence[int],
    num_tokens: int,
    block_size: int,
    root: int,
    lora_name: str | None = None,
    cache_salt: str | None = None,
) -> None:
    """Append the hashes of the full blocks of ``tokens[:num_tokens]`` not in ``hashes`` yet."""
    start = len(hashes)
    end = num_tokens // block_size
    if end <= start:
        return
    parent = hashes[-1] if hashes else root
    buf = array("I", tokens[start * block_size : end * block_size]).tobytes()
    step = block_size * 4
    digest = xxhash.xxh3_64_intdigest
    begin = 0
    if start == 0:  # the first block alone carries the cache salt
        first = _extra_bytes(block_extra_keys(0, lora_name, cache_salt))
        parent = digest(buf[:step] + first, seed=parent)
        hashes.append(parent)
        begin = step
    rest = _extra_bytes(block_extra_keys(1, lora_name, cache_salt))
    for off in range(begin, len(buf), step):
        parent = digest(buf[off : off + step] + rest, seed=parent)
        hashes.append(parent)


class KVCache:
    """``num_blocks`` blocks of ``block_size`` tokens; events accumulate until :meth:`take_events`."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        # Insertion order is the eviction order: popitem(last=False) takes the least recently freed.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._used = 0
        self._events: list[KVEvent] = []

    # -- queries -----------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be allocated (free, cached or not)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self._used

    @property
    def usage(self) -> float:
        """vllm:kv_cache_usage_perc: blocks held by requests over all blocks."""
        return self._used / self.num_blocks

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> int | None:
        return self._hash[block_id]

    def free_order(self) -> list[int]:
        """Free block ids, next to be allocated first (O(free blocks): for tests and debugging)."""
        return list(self._free)

    def find_prefix(self, hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Block ids of the longest cached prefix of ``hashes`` (at most ``max_blocks``)."""
        if not self.enable_prefix_caching:
            return []
        hit: list[int] = []
        get = self._cached.get
        for h in hashes[:max_blocks]:
            bid = get(h)
            if bid is None:
                break
            hit.append(bid)
        return hit

    def can_allocate(self, hit_blocks: Sequence[int], num_new: int) -> bool:
        """Whether touching ``hit_blocks`` and allocating ``num_new`` fresh blocks fits."""
        ref = self._ref
        reclaimable = sum(1 for b in hit_blocks if ref[b] == 0)
        return num_new <= len(self._free) - reclaimable

    # -- mutations ---------------------------------------------------------------------------
    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks hit by a request (out of the free queue if idle)."""
        ref = self._ref
        for b in block_ids:
            if ref[b] == 0:
                del self._free[b]
                self._used += 1
            ref[b] += 1

    def allocate(self, num: int) -> list[int]:
        """``num`` fresh blocks; the caller checked :meth:`can_allocate`. Evicts cached ones."""
        out: list[int] = []
        popitem = self._free.popitem
        ref = self._ref
        hashes = self._hash
        removed: list[int] = []
        for _ in range(num):
            b, _none = popitem(last=False)
            h = hashes[b]
            if h is not None:
                hashes[b] = None
                if self._cached.get(h) == b:
                    del self._cached[h]
                    removed.append(h)
            ref[b] = 1
            out.append(b)
        self._used += num
        if removed:
            self._events.append(BlockRemoved(block_hashes=removed))
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop a request's references; blocks reaching zero join the free queue tail first."""
        ref = self._ref
        free = self._free
        for b in reversed(block_ids):
            ref[b] -= 1
            if ref[b] == 0:
                free[b] = None
                self._used -= 1

    def commit(
        self,
        block_ids: Sequence[int],
        hashes: Sequence[int],
        start: int,
        end: int,
        tokens: Sequence[int],
        lora_name: str | None,
        cache_salt: str | None = None,
        *,
        lora_id: int | None = None,
    ) -> None:
        """Cache the request's full blocks ``start..end-1`` and emit one BlockStored per run of them."""
        if not self.enable_prefix_caching or end <= start:
            return
        cached = self._cached
        block_hash = self._hash
        run: list[int] = []
        run_start = start
        for i in range(start, end):
            b = block_ids[i]
            h = hashes[i]
            # Skipped: a block already cached (a prefix hit), or identical content another request
            # committed first (vLLM would keep both under one key; one copy is enough here).
            if block_hash[b] is not None or h in cached:
                self._emit_stored(run, run_start, hashes, tokens, lora_name, cache_salt, lora_id)
                run = []
                run_start = i + 1
                continue
            block_hash[b] = h
            cached[h] = b
            run.append(h)
        self._emit_stored(run, run_start, hashes, tokens, lora_name, cache_salt, lora_id)

    def _emit_stored(
        self,
        run: list[int],
        first: int,
        hashes: Sequence[int],
        tokens: Sequence[int],
        lora_name: str | None,
        cache_salt: str | None,
        lora_id: int | None,
    ) -> None:
        if not run:
            return
        bs = self.block_size
        self._events.append(
            BlockStored(
                block_hashes=run,
                parent_block_hash=hashes[first - 1] if first > 0 else None,
                token_ids=list(tokens[first * bs : (first + len(run)) * bs]),
                block_size=bs,
                lora_id=lora_id,  # vLLM 0.24 fills both from the request's LoRARequest
                medium="GPU",
                lora_name=lora_name,
                extra_keys=[
                    block_extra_keys(i, lora_name, cache_salt) for i in range(first, first + len(run))
                ],
                group_idx=0,
                kv_cache_spec_kind="full_attention",
            )
        )

    def reset(self) -> bool:
        """Forget every cached hash if no block is in use (vLLM refuses otherwise)."""
        if self._used:
            return False
        for b in self._cached.values():
            self._hash[b] = None
        self._cached.clear()
        # vLLM rebuilds the free queue in block order on reset.
        self._free = OrderedDict.fromkeys(range(self.num_blocks))
        self._events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVEvent]:
        """Events since the previous call, oldest first."""
        events = self._events
        self._events = []
        return events
