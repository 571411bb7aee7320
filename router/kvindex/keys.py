"""Block keys of a request, cached by prompt and by shared prefix.

Keys are the chained hashes of :func:`kvstack.common.blocks.block_keys`, scoped by
``chain_root(model, lora_name, cache_salt)`` and cut at the engine's block size. Hashing costs
~0.4 µs per block in Python, ~0.1 ms for a 4K-token prompt, on the request's path. Most prompts
repeat or extend one seen before: a shared system prompt with a new question, a chat resent with
one more turn, a document asked about again. So:

* the proxy's tokenizer cache hands back the same sequence object for the same text, and an
  identity hit returns its keys in O(1);
* otherwise one streaming digest over the token bytes marks a checkpoint every
  ``checkpoint_blocks`` blocks; the deepest checkpoint seen before supplies the keys up to it, and
  only the blocks after it are hashed (a few dozen, not the whole prompt).

Both are bounded together by bytes, not entries: a real-size prompt's array and keys weigh ~30 KB,
so a bound by count (once 2,048 prompts and 65,536 checkpoints) let them take ~60 MB.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache

import xxhash

from kvstack.common.blocks import TOKEN_ID_BYTES, chain_bytes, chain_root, token_bytes


@lru_cache(maxsize=4096)
def request_root(model: str, lora_name: str | None, cache_salt: str | None) -> int:
    """The chain root for a request scope (cached: a handful of scopes repeat forever)."""
    return chain_root(model, lora_name, cache_salt)


# What the cache pays per entry besides the keys it points to: the OrderedDict slot and link, the
# 3-tuple key and its ints (~250 bytes measured with tracemalloc on CPython 3.11, rounded up).
ENTRY_BYTES = 300
# A keys tuple of n keys: its header, n pointers and n 64-bit ints (32 bytes each). Ints shared with
# an older tuple (a prompt extending a cached one) are counted again: the budget errs high, never low.
TUPLE_BYTES, KEY_BYTES = 40, 8 + 32


def keys_bytes(keys: tuple[int, ...]) -> int:
    """What a keys tuple costs, its key ints included."""
    return TUPLE_BYTES + KEY_BYTES * len(keys)


class KeyCache:
    """Caches of ``(tokens, block_size, root) -> keys``, by identity and by checkpoint, holding at
    most ``max_bytes`` together.

    What is counted: each entry's :data:`ENTRY_BYTES`, each distinct keys tuple once (however many
    checkpoints share it, :func:`keys_bytes`), and the token arrays the identity cache keeps alive
    (``sys.getsizeof``: an array also held by a token cache is counted in both, erring high). The
    oldest entries go first, identity entries before checkpoints when both are over their half.

    ``hits`` count prompts whose keys were all known, ``misses`` prompts that hashed at least one
    block, ``hashed_blocks`` the blocks hashed (what the checkpoints save shows there).
    """

    def __init__(self, max_bytes: int = 32 << 20, checkpoint_blocks: int = 16) -> None:
        if max_bytes < 64 * 1024 or checkpoint_blocks <= 0:
            raise ValueError("max_bytes must be at least 64 KiB and checkpoint_blocks positive")
        self.max_bytes = max_bytes
        self.checkpoint_blocks = checkpoint_blocks
        self.bytes = 0  # what the entries hold, as counted above
        # id(tokens) -> (tokens, keys, cost); holding `tokens` keeps its id unique while cached
        self._by_id: OrderedDict[tuple[int, int, int], tuple[Sequence[int], tuple[int, ...], int]] = (
            OrderedDict()
        )
        # (digest of the first n blocks' bytes seeded by root, n, block_size) -> keys of >= n blocks
        self._checkpoints: OrderedDict[tuple[int, int, int], tuple[int, ...]] = OrderedDict()
        self._refs: dict[int, int] = {}  # id(keys tuple) -> entries holding it (counted once)
        self.id_bytes = 0  # the identity cache's share of `bytes`, entries and arrays
        self.hits = 0
        self.misses = 0
        self.hashed_blocks = 0

    def keys(self, tokens: Sequence[int], block_size: int, root: int) -> tuple[int, ...]:
        """Keys of the full blocks of ``tokens``; the result is shared, never mutate it."""
        id_key = (id(tokens), block_size, root)
        by_id = self._by_id
        found = by_id.get(id_key)
        if found is not None and found[0] is tokens:
            by_id.move_to_end(id_key)
            self.hits += 1
            return found[1]
        keys = self._from_checkpoints(tokens, block_size, root)
        if found is not None:  # a dead array's id reused: drop what it held
            self._drop_id(by_id.pop(id_key))
        cost = ENTRY_BYTES + sys.getsizeof(tokens)
        by_id[id_key] = (tokens, keys, cost)
        self.id_bytes += cost
        self.bytes += cost
        self._ref(keys)
        self._trim()
        return keys

    def _ref(self, keys: tuple[int, ...]) -> None:
        n = self._refs.get(id(keys), 0)
        if n == 0:
            self.bytes += keys_bytes(keys)
        self._refs[id(keys)] = n + 1

    def _unref(self, keys: tuple[int, ...]) -> None:
        n = self._refs.pop(id(keys)) - 1
        if n:
            self._refs[id(keys)] = n
        else:
            self.bytes -= keys_bytes(keys)

    def _drop_id(self, entry: tuple[Sequence[int], tuple[int, ...], int]) -> None:
        self.id_bytes -= entry[2]
        self.bytes -= entry[2]
        self._unref(entry[1])

    def _trim(self) -> None:
        """Evict the oldest entries until the budget holds: the identity cache first while it holds
        more than half (its arrays weigh most), checkpoints otherwise."""
        by_id, checkpoints = self._by_id, self._checkpoints
        while self.bytes > self.max_bytes:
            if by_id and (self.id_bytes > self.max_bytes // 2 or not checkpoints):
                self._drop_id(by_id.popitem(last=False)[1])
            elif checkpoints:
                self.bytes -= ENTRY_BYTES
                self._unref(checkpoints.popitem(last=False)[1])
            else:
                break

    def _from_checkpoints(self, tokens: Sequence[int], block_size: int, root: int) -> tuple[int, ...]:
        n = len(tokens) // block_size
        step = block_size * TOKEN_ID_BYTES
        buf = memoryview(token_bytes(tokens))[: n * step]  # whole blocks only
        every = self.checkpoint_blocks
        marks = [*range(every, n, every), n] if n else []
        digests: list[int] = []
        h, done = xxhash.xxh3_64(seed=root), 0
        for m in marks:
            h.update(buf[done * step : m * step])
            done = m
            digests.append(h.intdigest())
        checkpoints = self._checkpoints
        base: tuple[int, ...] = ()
        for m, d in zip(reversed(marks), reversed(digests), strict=True):
            known = checkpoints.get((d, m, block_size))
            if known is not None:
                checkpoints.move_to_end((d, m, block_size))
                base = known if len(known) == m else known[:m]
                break
        if len(base) == n:
            self.hits += 1
            return base
        self.misses += 1
        self.hashed_blocks += n - len(base)
        keys = base + tuple(chain_bytes(buf[len(base) * step :], step, base[-1] if base else root))
        for m, d in zip(marks, digests, strict=True):
            ck = (d, m, block_size)
            if ck not in checkpoints:  # an existing twin keeps its tuple
                checkpoints[ck] = keys
                self.bytes += ENTRY_BYTES
                self._ref(keys)
        self._trim()
        return keys

    def __len__(self) -> int:
        return len(self._checkpoints)

    def identity_entries(self) -> int:
        return len(self._by_id)
