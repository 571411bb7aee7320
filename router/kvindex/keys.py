"""Block keys of a request, cached per token sequence.

Keys are the chained hashes of :func:`kvstack.common.blocks.block_keys`, scoped by
``chain_root(model, lora_name, cache_salt)`` and cut at the engine's block size. Hashing an
8K-token prompt costs ~0.1 ms; the proxy's tokenizer cache hands back the same sequence object
for the same text, so an identity hit makes repeated prompts free, and a content digest catches
equal sequences held in different objects.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache

import xxhash

from kvstack.common.blocks import block_keys, chain_root


@lru_cache(maxsize=4096)
def request_root(model: str, lora_name: str | None, cache_salt: str | None) -> int:
    """The chain root for a request scope (cached: a handful of scopes repeat forever)."""
    return chain_root(model, lora_name, cache_salt)


class KeyCache:
    """A bounded LRU of ``(tokens, block_size, root) -> keys``."""

    def __init__(self, capacity: int = 2048) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        # id(tokens) -> (tokens, block_size, root, keys); holding `tokens` keeps its id unique
        self._by_id: OrderedDict[tuple[int, int, int], tuple[Sequence[int], tuple[int, ...]]] = OrderedDict()
        self._by_digest: OrderedDict[tuple[int, int, int], tuple[int, ...]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def keys(self, tokens: Sequence[int], block_size: int, root: int) -> tuple[int, ...]:
        """Keys of the full blocks of ``tokens``; the result is shared, never mutate it."""
        id_key = (id(tokens), block_size, root)
        found = self._by_id.get(id_key)
        if found is not None and found[0] is tokens:
            self._by_id.move_to_end(id_key)
            self.hits += 1
            return found[1]
        digest = xxhash.xxh3_64_intdigest(array("I", tokens).tobytes()) if tokens else 0
        dkey = (digest ^ len(tokens), block_size, root)
        keys = self._by_digest.get(dkey)
        if keys is None:
            self.misses += 1
            keys = tuple(block_keys(tokens, block_size, root))
            self._by_digest[dkey] = keys
            if len(self._by_digest) > self.capacity:
                self._by_digest.popitem(last=False)
        else:
            self.hits += 1
            self._by_digest.move_to_end(dkey)
        self._by_id[id_key] = (tokens, keys)
        if len(self._by_id) > self.capacity:
            self._by_id.popitem(last=False)
        return keys

    def __len__(self) -> int:
        return len(self._by_digest)
