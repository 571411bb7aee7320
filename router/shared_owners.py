"""Stored-response owners shared by the router's workers (``workers: N``, router/workers.py).

A ``/v1/responses`` answer relayed by one worker teaches it ``response id -> engine``
(router/sticky.py); the ``GET``, the ``cancel`` or the next turn naming it as
``previous_response_id`` arrive on another connection, often at another worker. So each worker
also writes what it learns into one table every worker maps, and a worker that does not know an id
looks there.

**The table** is a file of 64-bit cells (``owners.table`` beside the load table), a 2-way
set-associative hash table: an id hashes to a pair of cells. A cell is one aligned 8-byte store, so
a reader never sees half of one, and needs no lock:

- bits 63..28: 36 more bits of the id's hash (the tag; a false match is one in 6.9e10 per lookup);
- bits 27..16: the engine's column in the load table plus one (0: empty), the slot map every
  worker shares (router/shared_load.py), so the cell names the engine without its URL;
- bits 15..0: the minute it was written (``time.monotonic``, one clock for every process on the
  host), modulo 2^16, for ``ttl_s``.

A write takes the pair's cell that holds the same id, else an empty one, else the older one; two
workers writing the same pair at once may lose one id (the next request for it is answered 404 as
for an unknown id, vLLM's answer when its store lost it). Sized at four cells per
``sticky_responses.max_entries``, the newest ``max_entries`` ids are nearly all kept.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from pathlib import Path
from typing import Final

import xxhash

from kvstack.router.sticky import ResponseOwners, StickyResponsesConfig

_CELL = 8
_SLOT_BITS, _TIME_BITS = 12, 16
_TIME_MASK: Final = (1 << _TIME_BITS) - 1
_SLOT_MASK: Final = (1 << _SLOT_BITS) - 1
_TAG_SHIFT: Final = _SLOT_BITS + _TIME_BITS
MIN_CELLS: Final = 1024


def table_cells(max_entries: int) -> int:
    """Cells for ``max_entries`` ids: four per id, a power of two (the hash picks a pair by mask)."""
    want = max(MIN_CELLS, 4 * max_entries)
    return 1 << (want - 1).bit_length()


def encode(tag: int, slot: int, minute: int) -> int:
    return (tag << _TAG_SHIFT) | ((slot + 1) << _TIME_BITS) | (minute & _TIME_MASK)


def decode(cell: int) -> tuple[int, int | None, int]:
    """(tag, slot or None when empty, minute)."""
    slot = (cell >> _TIME_BITS) & _SLOT_MASK
    return cell >> _TAG_SHIFT, (slot - 1 if slot else None), cell & _TIME_MASK


def age_minutes(written: int, now_minute: int) -> int:
    return (now_minute - written) & _TIME_MASK


def pick_way(pair: tuple[int, int], tag: int, now_minute: int) -> int:
    """Which cell of the pair (0 or 1) an id with ``tag`` is written to: the one holding it, else an
    empty one, else the older."""
    decoded = [decode(c) for c in pair]
    for way, (t, slot, _) in enumerate(decoded):
        if slot is not None and t == tag:
            return way
    for way, (_, slot, _) in enumerate(decoded):
        if slot is None:
            return way
    return 0 if age_minutes(decoded[0][2], now_minute) >= age_minutes(decoded[1][2], now_minute) else 1


def find(pair: tuple[int, int], tag: int, now_minute: int, ttl_minutes: int) -> int | None:
    """The slot stored for ``tag`` in the pair, unless older than ``ttl_minutes``."""
    for cell in pair:
        t, slot, minute = decode(cell)
        if slot is not None and t == tag and age_minutes(minute, now_minute) <= ttl_minutes:
            return slot
    return None


class OwnersTable:
    """The mapped file; created by the supervisor, mapped by each worker."""

    def __init__(self, path: Path, cells: int) -> None:
        with path.open("r+b") as f:
            self._map = mmap.mmap(f.fileno(), cells * _CELL)
        self.path, self.cells = path, cells
        self._cells = memoryview(self._map).cast("Q")

    @classmethod
    def create(cls, path: Path, cells: int) -> OwnersTable:
        with path.open("wb") as f:
            f.truncate(cells * _CELL)
        return cls(path, cells)

    def _at(self, response_id: str) -> tuple[int, int]:
        h = xxhash.xxh3_64_intdigest(response_id.encode())
        return (h & (self.cells - 1)) & ~1, h >> _TAG_SHIFT  # an even index: the pair (i, i + 1)

    def write(self, response_id: str, slot: int, now: float) -> None:
        i, tag = self._at(response_id)
        minute = int(now // 60)
        way = pick_way((self._cells[i], self._cells[i + 1]), tag, minute)
        self._cells[i + way] = encode(tag, slot, minute)

    def read(self, response_id: str, now: float, ttl_s: float) -> int | None:
        i, tag = self._at(response_id)
        ttl_minutes = int(ttl_s // 60) + 1
        return find((self._cells[i], self._cells[i + 1]), tag, int(now // 60), ttl_minutes)

    def close(self) -> None:
        self._cells.release()
        self._map.close()


class SharedOwners(ResponseOwners):
    """A worker's owners: its own map first, then what the other workers wrote to the table."""

    def __init__(
        self,
        config: StickyResponsesConfig,
        table: OwnersTable,
        slot_of: Callable[[str], int | None],
        url_of: Callable[[int], str | None],
    ) -> None:
        super().__init__(config)
        self._table, self._slot_of, self._url_of = table, slot_of, url_of

    def remember(self, response_id: str, engine: str, now: float) -> None:
        super().remember(response_id, engine, now)
        slot = self._slot_of(engine)
        if self.max_entries and slot is not None:
            self._table.write(response_id, slot, now)

    def owner(self, response_id: str, now: float) -> str | None:
        mine = super().owner(response_id, now)
        if mine is not None or not self.max_entries:
            return mine
        slot = self._table.read(response_id, now, self.ttl_s)
        return None if slot is None else self._url_of(slot)
