"""Token arrays by digest: the one bounded cache of tokenizer output, and the digest that keys it.

The router (whole prompts, rendered chat messages, an engine's ``/tokenize`` answers) and the
simulator (rendered chat messages) keep what they tokenized in :class:`TokenCache`. Tokens are
uint32 arrays (``array("I")``): block keys hash their bytes in place, and a chat's prompt is its
messages' arrays joined by ``memcpy``, with no int object made per token. The cache is bounded by
the bytes it holds, so many small entries and a few huge ones cost what they weigh.

Keys are 128-bit :func:`digest` values: a collision is as unlikely as a hash collision gets, so the
texts themselves are never kept as keys (a cached 100 KB document costs its tokens, not its text).
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import xxhash

if TYPE_CHECKING:
    Tokens = array[int]  # array("I"): one uint32 per token id
else:
    Tokens = array

assert array("I").itemsize == 4, "token ids are hashed as uint32"

# What one entry costs besides its array (``sys.getsizeof``: header and allocated buffer, including
# the spare room an array built by ``+=`` over-allocates): the 128-bit int key (44 bytes) and the
# ordered dict's slot and link (~90), measured with tracemalloc on CPython 3.11 (tests/router/
# test_memory_bounds.py checks the sum against tracemalloc for real-size prompts).
ENTRY_BYTES = 150
MB = 1 << 20


def as_tokens(ids: Sequence[int]) -> Tokens:
    """``ids`` as a uint32 array (the same object when it already is one).

    Raises ``OverflowError`` for an id outside 0..2**32-1 and ``TypeError`` for a non-integer.
    """
    if isinstance(ids, array) and ids.typecode == "I":
        return ids
    return array("I", ids)


def digest(domain: bytes, parts: Sequence[str | bytes]) -> int:
    """A 128-bit digest of ``parts`` in ``domain`` (texts are hashed as UTF-8).

    Each part is length-prefixed: no choice of separator inside the texts can make two inputs collide,
    and the domain keeps inputs of different kinds (a completion's text, a chat message) apart.
    """
    h = xxhash.xxh3_128(domain)
    update = h.update
    for part in parts:
        data = part.encode("utf-8", "surrogatepass") if isinstance(part, str) else part
        update(len(data).to_bytes(8, "little"))
        update(data)
    return h.intdigest()


def digest_of_digests(domain: bytes, parts: Sequence[int]) -> int:
    """One digest over 128-bit digests (16 bytes each, so no framing is needed)."""
    h = xxhash.xxh3_128(domain)
    for part in parts:
        h.update(part.to_bytes(16, "little"))
    return h.intdigest()


_EMPTY = sys.getsizeof(array("I")) + ENTRY_BYTES  # what an empty entry costs


def _cost(tokens: Tokens) -> int:
    return sys.getsizeof(tokens) + ENTRY_BYTES


class TokenCache:
    """LRU of ``digest -> token array`` holding at most ``max_bytes`` (each array's size as
    ``sys.getsizeof`` has it, plus :data:`ENTRY_BYTES` per entry).

    Tokens that would take more than a quarter of the budget are handed back but never kept: one
    huge prompt must not flush everything the cache holds. Not thread-safe: one event loop uses it.
    """

    def __init__(self, max_bytes: int = 10 * MB) -> None:
        if max_bytes < 4 * _EMPTY:
            raise ValueError(f"max_bytes must be at least {4 * _EMPTY}")
        self.max_bytes = max_bytes
        self.bytes = 0  # held, summed over entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[int, Tokens] = OrderedDict()
        self._fresh: tuple[int, Tokens] | None = None  # the last put(), for the get() after it

    def find(self, key: int) -> Tokens | None:
        """The tokens held for ``key`` (a hit, now the most recent), or None (not counted)."""
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return found

    def get(self, key: int, make: Callable[[], Sequence[int]]) -> Tokens:
        """The cached tokens for ``key``, or ``make()``'s, remembered when they fit."""
        fresh = self._fresh
        if fresh is not None:
            self._fresh = None
            if fresh[0] == key:
                return fresh[1]  # just put(): that lookup was counted there
        found = self.find(key)
        if found is not None:
            return found
        self.misses += 1
        return self._remember(key, as_tokens(make()))

    def put(self, key: int, tokens: Sequence[int]) -> Tokens:
        """Remember tokens made elsewhere (a worker process, an engine); counts as the miss it was.

        The next :meth:`get` of ``key`` returns them uncounted, even when they were too large to
        keep. A concurrent twin that was put first wins, so identical prompts share one array.
        """
        found = self._entries.get(key)
        if found is None:
            self.misses += 1
            found = self._remember(key, as_tokens(tokens))
        self._fresh = (key, found)
        return found

    def replace(self, key: int, tokens: Sequence[int]) -> Tokens:
        """Keep ``tokens`` for ``key`` instead of what it held (found wrong after it was kept)."""
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= _cost(old)
        if self._fresh is not None and self._fresh[0] == key:
            self._fresh = None
        return self._remember(key, as_tokens(tokens))

    def _remember(self, key: int, made: Tokens) -> Tokens:
        cost = _cost(made)
        if cost > self.max_bytes // 4:
            return made
        self._entries[key] = made
        self.bytes += cost
        while self.bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= _cost(dropped)
        return made

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
