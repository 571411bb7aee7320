"""Simulated LMCache connector: a bounded local CPU tier and a shared Redis tier.

Chunks of ``chunk_size`` tokens are keyed by a hash chain seeded with the LMCache hash seed
(``PYTHONHASHSEED``), so two pods share entries only when they share the seed, as measured.
Redis holds a small marker per chunk, never KV bytes. Deciding what to load is pure
(:func:`plan_external`); Redis I/O runs on the event loop and never blocks an engine step: a
lookup that fails or times out is a miss, stores go through a bounded queue, and after a failure
the store is left alone for ``remote_retry_s`` before the next try.

KV events (``kv_events``), as LMCache's in-process connector makes them (``LMCacheEngine.store``,
forwarded by vLLM's ``LMCacheConnectorV1.get_kv_connector_kv_cache_events``): one ``BlockStored``
per stored chunk with ``block_hashes=[chunk hash]``, ``parent_block_hash`` the previous chunk's
hash (None for the prompt's first chunk), ``token_ids`` the chunk's tokens, ``block_size`` the
chunk size, ``medium="cpu"`` (lower case, as LMCache writes it), and ``lora_name``/``extra_keys``
None (LMCache sets neither, so a router cannot tell a salted or LoRA chunk apart). LMCache 0.5.3
publishes no removals (its KV-event RFC dropped eviction); ``kv_events_removed`` adds
``BlockRemoved(medium="cpu")`` on CPU-tier eviction for routers that want it. Events cover the
chunks the CPU tier takes in from a store; chunks copied in from Redis on a hit get none (LMCache's
retrieve path makes none), but their evictions are reported like any other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
import xxhash

from kvstack.common.kv_events import BlockRemoved, BlockStored, KVEvent
from kvstack.common.tasks import BackgroundTask
from kvstack.engine.sim.config import KV_BYTES_PER_TOKEN, LMCacheConfig

log = logging.getLogger(__name__)

TIER_CPU = 0
TIER_REMOTE = 1
# In Redis by its key, but its KV is gone (evicted by Redis's LRU while the key stayed): the load is
# paid and comes back short, and the engine recomputes from this chunk on. LMCache keeps skipping
# the store of a chunk whose key exists, so the same chunk keeps failing.
TIER_FAILED = 2
_FAILURE_SCALE = 1 << 32
_STORE_QUEUE = 4096


def lmcache_root(seed: int, model: str, lora_name: str | None, cache_salt: str | None) -> int:
    """The parent hash of a request's first chunk."""
    scope = f"lmcache\x00{seed}\x00{model}\x00{lora_name or ''}\x00{cache_salt or ''}"
    return int(xxhash.xxh3_64_intdigest(scope.encode()))


def chunk_hashes(tokens: Sequence[int], chunk_size: int, root: int) -> list[int]:
    """Chained hashes of the full chunks of ``tokens`` (a partial tail chunk is never stored)."""
    n = len(tokens) // chunk_size
    if n == 0:
        return []
    buf = array("I", tokens[: n * chunk_size]).tobytes()
    step = chunk_size * 4
    out: list[int] = []
    parent = root
    for off in range(0, len(buf), step):
        parent = xxhash.xxh3_64_intdigest(buf[off : off + step], seed=parent)
        out.append(parent)
    return out


CPU_MEDIUM = "cpu"  # LMCache's spelling (vLLM's own tier is "GPU")


@dataclass(frozen=True, slots=True)
class ChunkRun:
    """Chunks ``first..end-1`` of one request's prompt, computed and ready to offload."""

    hashes: Sequence[int]  # every chunk hash of the request
    tokens: Sequence[int]
    first: int
    end: int


@dataclass(frozen=True, slots=True)
class ExternalPlan:
    """Prompt tokens to load from LMCache instead of computing, by tier."""

    cpu_tokens: int = 0
    remote_tokens: int = 0
    failed_tokens: int = 0  # asked of the remote tier and not read back: loaded in vain, then computed

    @property
    def tokens(self) -> int:
        """Tokens that come back (the engine skips computing them)."""
        return self.cpu_tokens + self.remote_tokens

    @property
    def remote_load_tokens(self) -> int:
        """Tokens the remote load asks for, whether or not they come back (what it costs)."""
        return self.remote_tokens + self.failed_tokens

    @property
    def asked_tokens(self) -> int:
        """Tokens asked of both tiers: what LMCache's retrieve requests (``num_requested_tokens``);
        ``tokens`` is what it retrieved (``num_hit_tokens``)."""
        return self.cpu_tokens + self.remote_load_tokens


def plan_external(gpu_hit: int, tiers: Sequence[int], chunk_size: int, num_tokens: int) -> ExternalPlan:
    """What to load after a GPU hit of ``gpu_hit`` tokens, given the tiers of the leading chunks.

    Like LMCache, a hit that covers the whole prompt gives back its last token, which must be
    computed to produce logits. From a failed chunk on, every token asked for is loaded in vain
    (``failed_tokens``) and computed (vLLM's ``kv_load_failure_policy: recompute``).
    """
    end = min(len(tiers) * chunk_size, num_tokens - 1)
    if end <= gpu_hit:
        return ExternalPlan()
    cpu = remote = 0
    pos = gpu_hit
    while pos < end:
        idx = pos // chunk_size
        upto = min((idx + 1) * chunk_size, end)
        if tiers[idx] == TIER_FAILED:
            return ExternalPlan(cpu_tokens=cpu, remote_tokens=remote, failed_tokens=end - pos)
        if tiers[idx] == TIER_CPU:
            cpu += upto - pos
        else:
            remote += upto - pos
        pos = upto
    return ExternalPlan(cpu_tokens=cpu, remote_tokens=remote)


def lost_in_store(chunk_hash: int, failure: float) -> bool:
    """Whether the store lost ``chunk_hash``'s KV (keeping its key): a fixed draw per chunk."""
    if failure <= 0.0:
        return False
    draw = xxhash.xxh3_64_intdigest(chunk_hash.to_bytes(8, "little")) % _FAILURE_SCALE
    return draw < failure * _FAILURE_SCALE


def remote_tiers(found: Sequence[int], failure: float) -> list[int]:
    """Tiers of the leading remote chunks ``found``: TIER_REMOTE up to the first lost one, then
    TIER_FAILED (LMCache asked for all of them; it reads back the leading ones only)."""
    for i, h in enumerate(found):
        if lost_in_store(h, failure):
            return [TIER_REMOTE] * i + [TIER_FAILED] * (len(found) - i)
    return [TIER_REMOTE] * len(found)


class CpuTier:
    """LMCache's local CPU backend: an LRU set of chunk hashes bounded by bytes."""

    def __init__(self, capacity_chunks: int) -> None:
        self.capacity = capacity_chunks
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.evictions = 0

    @classmethod
    def for_config(cls, cfg: LMCacheConfig) -> CpuTier:
        chunk_bytes = cfg.chunk_size * KV_BYTES_PER_TOKEN
        return cls(int(cfg.local_cpu_gb * 1e9) // chunk_bytes)

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: int) -> bool:
        return key in self._lru

    def leading(self, keys: Sequence[int]) -> int:
        """How many of ``keys``, from the first, are held (each one hit is refreshed)."""
        n = 0
        lru = self._lru
        for k in keys:
            if k not in lru:
                break
            lru.move_to_end(k)
            n += 1
        return n

    def put(self, keys: Sequence[int]) -> list[int]:
        """Hold ``keys`` (most recent last); returns the keys evicted to make room."""
        if self.capacity <= 0:
            return []
        lru = self._lru
        for k in keys:
            lru[k] = None
            lru.move_to_end(k)
        evicted: list[int] = []
        while len(lru) > self.capacity:
            evicted.append(lru.popitem(last=False)[0])
        self.evictions += len(evicted)
        return evicted

    def clear(self) -> list[int]:
        """Drop every chunk (LMCache's ``DELETE /cache/clear``); returns them, oldest first. Not
        counted as evictions: LMCache's evict counters count only what allocation pushed out."""
        cleared = list(self._lru)
        self._lru.clear()
        return cleared


class RemoteStore:
    """The shared tier in Redis: one marker key per chunk, written asynchronously."""

    def __init__(self, cfg: LMCacheConfig, model: str) -> None:
        assert cfg.remote_url is not None
        self._cfg = cfg
        self._prefix = f"{cfg.key_prefix}{model}@"
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            cfg.remote_url,
            socket_timeout=cfg.remote_timeout_s,
            socket_connect_timeout=cfg.remote_timeout_s,
        )
        self._queue: asyncio.Queue[list[int]] = asyncio.Queue(maxsize=_STORE_QUEUE)
        self._writer = BackgroundTask("lmcache-redis", self._write_loop, logger=log)
        self._down_until = 0.0
        self._logged_down = False
        self.failures = 0
        self.dropped_stores = 0
        self.lookups = 0
        self.stored_chunks = 0

    def key(self, chunk_hash: int) -> str:
        return f"{self._prefix}{chunk_hash:016x}"

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def start(self) -> None:
        self._writer.start()

    async def stop(self) -> None:
        await self._writer.stop()
        # types-redis predates aclose() (redis-py >= 5), which replaced the deprecated close().
        await self._client.aclose()

    def _failed(self, err: BaseException) -> None:
        self.failures += 1
        self._down_until = time.monotonic() + self._cfg.remote_retry_s
        if not self._logged_down:
            self._logged_down = True
            log.warning(
                "LMCache remote store %s unavailable, recomputing instead: %r", self._cfg.remote_url, err
            )

    def _recovered(self) -> None:
        if self._logged_down:
            self._logged_down = False
            log.info("LMCache remote store %s is back", self._cfg.remote_url)

    async def leading(self, keys: Sequence[int]) -> int:
        """How many of ``keys``, from the first, the store holds; 0 when it is unavailable."""
        if not keys or not self.available:
            return 0
        self.lookups += 1
        try:
            async with asyncio.timeout(self._cfg.remote_timeout_s):
                found = await self._client.mget([self.key(k) for k in keys])
        except (aioredis.RedisError, OSError, TimeoutError) as err:
            self._failed(err)
            return 0
        self._recovered()
        n = 0
        for v in found:
            if v is None:
                break
            n += 1
        return n

    def put(self, keys: list[int]) -> None:
        """Queue chunk markers for writing; dropped when the queue is full or the store is down."""
        if not self.available:
            self.dropped_stores += len(keys)
            return
        try:
            self._queue.put_nowait(keys)
        except asyncio.QueueFull:
            self.dropped_stores += len(keys)

    async def _write_loop(self) -> None:
        ttl = self._cfg.remote_ttl_s
        while True:
            keys = await self._queue.get()
            try:
                await self._write(keys, ttl)
            finally:
                self._queue.task_done()

    async def _write(self, keys: list[int], ttl: int) -> None:
        if not self.available:
            self.dropped_stores += len(keys)
            return
        try:
            async with asyncio.timeout(self._cfg.remote_timeout_s * 4):
                pipe = self._client.pipeline(transaction=False)
                for k in keys:
                    pipe.set(self.key(k), b"1", ex=ttl)
                await pipe.execute()
        except (aioredis.RedisError, OSError, TimeoutError) as err:
            self._failed(err)
            self.dropped_stores += len(keys)
            return
        self._recovered()
        self.stored_chunks += len(keys)

    async def flush(self) -> None:
        """Wait until queued writes are done (tests, shutdown)."""
        await self._queue.join()


class LMCacheConnector:
    """Both tiers behind the two calls the engine makes: look up a prompt, store its chunks."""

    def __init__(self, cfg: LMCacheConfig, model: str, seed: int) -> None:
        self.cfg = cfg
        self.model = model
        self.seed = seed
        self.cpu = CpuTier.for_config(cfg)
        self.remote = RemoteStore(cfg, model) if cfg.remote_url else None
        self._events: list[KVEvent] = []

    def root(self, lora_name: str | None, cache_salt: str | None) -> int:
        return lmcache_root(self.seed, self.model, lora_name, cache_salt)

    def start(self) -> None:
        if self.remote is not None:
            self.remote.start()

    async def stop(self) -> None:
        if self.remote is not None:
            await self.remote.stop()

    async def lookup(self, hashes: Sequence[int]) -> list[int]:
        """Tiers of the leading chunks found (CPU first, then Redis), contiguous from chunk 0; remote
        chunks from the first lost one on are TIER_FAILED."""
        n_cpu = self.cpu.leading(hashes)
        tiers = [TIER_CPU] * n_cpu
        if self.remote is not None and n_cpu < len(hashes):
            rest = hashes[n_cpu:]
            n_remote = await self.remote.leading(rest)
            if n_remote:
                found = remote_tiers(rest[:n_remote], self.cfg.remote_load_failure)
                tiers.extend(found)
                fetched = found.count(TIER_REMOTE)
                # LMCache keeps what it fetched from the remote in its local CPU tier.
                self._removed(self.cpu.put(rest[:fetched]))
        return tiers

    def store(self, run: ChunkRun) -> None:
        """Offload freshly computed chunks: CPU tier now, Redis in the background."""
        hashes = list(run.hashes[run.first : run.end])
        if not hashes:
            return
        cpu = self.cpu
        events = self.cfg.kv_events and cpu.capacity > 0
        # LMCache skips chunks it already holds, and so do its events.
        new = [i for i, h in enumerate(hashes, run.first) if h not in cpu] if events else []
        evicted = cpu.put(hashes)
        self._stored(run, new)
        self._removed(evicted)
        if self.remote is not None:
            self.remote.put(hashes)

    def clear_cpu(self) -> int:
        """Empty the CPU tier as LMCache's internal API ``DELETE /cache/clear?locations=
        LocalCPUBackend`` does; returns the tokens cleared (its ``num_removed``). Redis is untouched."""
        cleared = self.cpu.clear()
        self._removed(cleared)
        return len(cleared) * self.cfg.chunk_size

    @property
    def local_cpu_bytes(self) -> int:
        """Bytes of KV the CPU tier holds (``lmcache:local_cache_usage``), as it sizes its capacity."""
        return len(self.cpu) * self.cfg.chunk_size * KV_BYTES_PER_TOKEN

    def take_events(self) -> list[KVEvent]:
        """KV events since the previous call, oldest first (always empty without ``kv_events``)."""
        events, self._events = self._events, []
        return events

    def _stored(self, run: ChunkRun, indexes: list[int]) -> None:
        size = self.cfg.chunk_size
        for i in indexes:
            self._events.append(
                BlockStored(
                    block_hashes=[run.hashes[i]],
                    parent_block_hash=run.hashes[i - 1] if i > 0 else None,
                    token_ids=list(run.tokens[i * size : (i + 1) * size]),
                    block_size=size,
                    lora_id=None,
                    medium=CPU_MEDIUM,
                    lora_name=None,
                )
            )

    def _removed(self, evicted: list[int]) -> None:
        if evicted and self.cfg.kv_events_removed:
            self._events.append(BlockRemoved(block_hashes=evicted, medium=CPU_MEDIUM))
