"""One engine's slice of the KV index: its confirmed blocks per tier, keyed both ways, its
speculative and approximate entries and its parked orphans. Plain containers; ``KVIndex`` owns the
rules that fill and read them."""

from __future__ import annotations

from collections import OrderedDict

from kvstack.common.kv_events import BlockStored

GPU, CPU = 0, 1  # the tiers an engine's own events land in


def tier_of(medium: str | None) -> int:
    """The tier an event's ``medium`` names: GPU unless it says otherwise (LMCache's CPU tier)."""
    return GPU if medium is None or medium.upper() == "GPU" else CPU


class EngineSlice:
    """One engine's slice of the index."""

    __slots__ = (
        "approx",
        "block_size",
        "by_hash",
        "cap",
        "events",
        "held",
        "model",
        "n_keys",
        "orphans",
        "sized_by_events",
        "spec",
    )

    held: list[dict[int, int]]  # per tier: our key -> refcount
    by_hash: list[OrderedDict[int, tuple[int, ...]]]  # per tier: engine hash -> our keys, oldest first
    n_keys: list[int]
    spec: OrderedDict[int, float]  # key -> expiry (monotonic seconds), oldest first
    approx: OrderedDict[int, None]  # LRU; most recent at the end
    orphans: OrderedDict[int, list[BlockStored]]  # parent engine hash -> children waiting for it

    def __init__(self, model: str | None, block_size: int, cap: int, events: bool) -> None:
        self.model = model
        self.block_size = block_size
        self.sized_by_events = False  # a GPU event fixed block_size; scrapes no longer override it
        self.cap = cap
        self.events = events
        self.reset()

    def reset(self, *, keep_cpu: bool = False) -> None:
        cpu_held: dict[int, int] = self.held[CPU] if keep_cpu else {}
        cpu_hash: OrderedDict[int, tuple[int, ...]] = self.by_hash[CPU] if keep_cpu else OrderedDict()
        cpu_n = self.n_keys[CPU] if keep_cpu else 0
        self.held = [{}, cpu_held]
        self.by_hash = [OrderedDict(), cpu_hash]
        self.n_keys = [0, cpu_n]
        self.spec = OrderedDict()
        self.approx = OrderedDict()
        self.orphans = OrderedDict()
