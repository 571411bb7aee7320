"""Per-engine load shared by the router's worker processes (``workers: N``, router/workers.py).

Every worker routes on its own, but the engines are the same: without a shared count, N workers
would each see an engine as idle and send it N times what one router would. So every worker
publishes its own in-flight requests per engine into one shared-memory table and reads the
others' beside its own; :attr:`kvstack.router.engines.EngineState.in_flight` is that sum, so the
policies, flow control's saturation and the metrics see the whole router's load, and stay pure.

**The table** is int64 cells ``[worker][slot]`` in a file the supervisor creates and every worker maps
(``mmap``, shared). A worker writes only its own row (one writer per cell: an aligned 8-byte
store, so no lock and no torn value), and reads the column of a slot (N loads). A worker that
dies leaves counts of requests that died with it: the supervisor zeroes its row before the
replacement starts in the same row.

**The slot map** (:class:`SlotMap`, pure) gives each engine URL one column. The supervisor owns
it: workers ask over their pipe when discovery adds an engine and tell it when one goes
(:class:`SlotClient`); a column is reused only once no worker holds it, and each worker zeroes its
cell when it lets go, so a reused column starts at zero. A URL the full map cannot place (more
engines than ``SLOTS``) is routed on the worker's own count, as with one worker.

What is not shared: queued prefill tokens (the cache-aware policy's ledger) are per worker, and
reconciled with the engine's scraped ``num_requests_waiting`` as they already are for router
replicas (router/kvindex/ledger.py).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from kvstack.router.engines import EngineRegistry, EngineState

SLOTS: Final = 1024  # engine columns: far above the engines one router serves at once
_CELL = 8  # bytes: one int64


# ---------------------------------------------------------------------------- the slot map (pure)


@dataclass
class SlotMap:
    """Engine URL -> column of the load table, held by workers; owned by the supervisor."""

    capacity: int = SLOTS
    _slot_of: dict[str, int] = field(default_factory=dict)
    _holders: dict[int, set[int]] = field(default_factory=dict)  # slot -> workers holding it
    _free: list[int] = field(default_factory=list)
    _next: int = 0  # slots below it were handed out once

    def acquire(self, worker: int, url: str) -> int | None:
        """The URL's slot, now held by ``worker`` too; None when every slot is taken."""
        slot = self._slot_of.get(url)
        if slot is None:
            if self._free:
                slot = self._free.pop()
            elif self._next < self.capacity:
                slot, self._next = self._next, self._next + 1
            else:
                return None
            self._slot_of[url] = slot
            self._holders[slot] = set()
        self._holders[slot].add(worker)
        return slot

    def release(self, worker: int, url: str) -> int | None:
        """``worker`` no longer uses the URL; returns its slot when that made it free."""
        slot = self._slot_of.get(url)
        if slot is None:
            return None
        holders = self._holders[slot]
        holders.discard(worker)
        if holders:
            return None
        del self._slot_of[url], self._holders[slot]
        self._free.append(slot)
        return slot

    def release_worker(self, worker: int) -> list[int]:
        """A worker died: everything it held is released; returns the slots that became free."""
        held = [url for url, slot in self._slot_of.items() if worker in self._holders[slot]]
        return [slot for url in held if (slot := self.release(worker, url)) is not None]

    def slot(self, url: str) -> int | None:
        return self._slot_of.get(url)


# ---------------------------------------------------------------------------- the shared table


class LoadTable:
    """The shared int64 table ``[worker][slot]``: a file the supervisor creates in its run folder
    (on tmpfs where there is one), mapped shared by every worker."""

    def __init__(self, path: Path, workers: int, slots: int = SLOTS) -> None:
        size = workers * slots * _CELL
        with path.open("r+b") as f:
            if os.fstat(f.fileno()).st_size < size:
                raise ValueError(f"shared load table {path} is too small for {workers}x{slots}")
            self._map = mmap.mmap(f.fileno(), size)  # MAP_SHARED: every process sees each store
        self.path, self.workers, self.slots = path, workers, slots
        self._cells = memoryview(self._map).cast("q")

    @classmethod
    def create(cls, path: Path, workers: int, slots: int = SLOTS) -> LoadTable:
        with path.open("wb") as f:
            f.truncate(workers * slots * _CELL)  # zero-filled
        return cls(path, workers, slots)

    def cell(self, worker: int, slot: int) -> LoadCell:
        return LoadCell(self, worker, slot)

    def total(self, slot: int) -> int:
        """Requests in flight at the slot's engine over every worker."""
        return sum(self._cells[slot :: self.slots])

    def clear_row(self, worker: int) -> None:
        """Zero a dead worker's counts (only the supervisor, once the worker is gone)."""
        start = worker * self.slots
        self._cells[start : start + self.slots] = _zeros(self.slots)

    def clear_slot(self, slot: int) -> None:
        for worker in range(self.workers):
            self._cells[worker * self.slots + slot] = 0

    def close(self) -> None:
        self._cells.release()
        self._map.close()


def _zeros(n: int) -> memoryview:
    return memoryview(bytes(n * _CELL)).cast("q")


class LoadCell:
    """One worker's view of one engine's column: publishes its own count, reads the others'."""

    __slots__ = ("_cells", "_own", "_start", "_step", "slot")

    def __init__(self, table: LoadTable, worker: int, slot: int) -> None:
        self._cells = table._cells
        self._own = worker * table.slots + slot
        self._start, self._step = slot, table.slots
        self.slot = slot

    def publish(self, own: int) -> None:
        self._cells[self._own] = own

    def peers(self) -> int:
        """The other workers' requests in flight at this engine."""
        cells = self._cells
        return sum(cells[self._start :: self._step]) - cells[self._own]


# ---------------------------------------------------------------------------- the slot protocol

# worker -> supervisor: ("acquire" | "release", url); supervisor -> worker: the slot or None
SlotOp = Literal["acquire", "release"]


class SlotClient:
    """A worker's end of its pipe to the supervisor's :class:`SlotMap` (membership changes only)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def acquire(self, url: str) -> int | None:
        self._conn.send(("acquire", url))
        slot: int | None = self._conn.recv()
        return slot

    def release(self, url: str) -> None:
        self._conn.send(("release", url))
        self._conn.recv()


def answer(slots: SlotMap, table: LoadTable, worker: int, op: SlotOp, url: str) -> int | None:
    """The supervisor's answer to one request of ``worker``."""
    if op == "acquire":
        return slots.acquire(worker, url)
    freed = slots.release(worker, url)
    if freed is not None:
        table.clear_slot(freed)  # already zero: every holder zeroed its cell before letting go
    return None


class SharedLoad:
    """Attaches each engine of a worker's registry to its column (a registry listener)."""

    def __init__(self, registry: EngineRegistry, table: LoadTable, worker: int, client: SlotClient) -> None:
        self._registry, self._table, self._worker, self._client = registry, table, worker, client
        self._attached: dict[str, EngineState] = {}
        self._urls: dict[int, str] = {}  # slot -> URL, of the engines attached here

    def start(self) -> None:
        self._registry.listeners.insert(0, self.sync)  # before anything routes to a new engine
        self.sync()

    def sync(self) -> None:
        """Attach engines discovery added, detach those it removed (called on every change)."""
        current = {st.url: st for st in self._registry.all()}
        for url in self._attached.keys() - current.keys():
            self._detach(self._attached.pop(url))
        for url, st in current.items():
            known = self._attached.get(url)
            if known is st:
                continue
            if known is not None:
                self._detach(known)
            slot = self._client.acquire(url)
            if slot is not None:
                st.attach_load(self._table.cell(self._worker, slot))
                self._urls[slot] = url
            self._attached[url] = st

    def _detach(self, st: EngineState) -> None:
        cell = st.load_cell
        if cell is not None and st.detach_load():
            self._urls.pop(cell.slot, None)
            self._client.release(st.url)

    def slot_of(self, url: str) -> int | None:
        """The engine's column, shared by every worker (router/shared_owners.py names engines by it)."""
        st = self._attached.get(url)
        cell = st.load_cell if st is not None else None
        return cell.slot if cell is not None else None

    def url_of(self, slot: int) -> str | None:
        return self._urls.get(slot)

    def close(self) -> None:
        for st in self._attached.values():
            st.detach_load()
        self._attached.clear()
        self._urls.clear()


def column_totals(table: LoadTable, slots: Iterable[int]) -> dict[int, int]:
    """In-flight totals of the given slots (tests and the supervisor's view)."""
    return {slot: table.total(slot) for slot in slots}
