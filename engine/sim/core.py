"""The simulated engine core: scheduler steps paced by the latency model on an asyncio loop.

Each step is planned by :class:`Scheduler`, lasts ``step_time / speed`` seconds of a virtual
clock, and is applied when the wall clock reaches its end. The loop sleeps on an event when idle;
when steps are shorter than the timer resolution (high ``speed``) it runs several per wake-up
and yields to the event loop about once a millisecond. Lateness of a wake-up is not carried into
the next step (the virtual clock keeps its own time unless the engine falls behind), so long runs
keep the modelled pace. Outputs reach each consumer through an event and a token list, so a
consumer that lags gets several tokens in one :class:`RequestOutput`, as vLLM V1's output
collector does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import cast

from kvstack.common.errors import OpenAIError
from kvstack.common.tasks import BackgroundTask
from kvstack.engine.sim.config import SimConfig
from kvstack.engine.sim.generator import output_length, output_seed
from kvstack.engine.sim.gpu_peers import GpuPeers, share_for
from kvstack.engine.sim.kv_cache import KVCache, engine_chain_root
from kvstack.engine.sim.latency import engine_frontend_delay, engine_step_time, retrieve_time, store_time
from kvstack.engine.sim.lmcache import LMCacheConnector, chunk_hashes
from kvstack.engine.sim.lora import AdapterSlots
from kvstack.engine.sim.protocol import check_length
from kvstack.engine.sim.scheduler import Scheduler, StepPlan
from kvstack.engine.sim.stream import Req, RequestStream, finished_stats
from kvstack.engine.sim.types import EventSink, FinishReason, RequestOutput, SimRequest, StatsListener

log = logging.getLogger(__name__)

# A virtual clock less than this far behind the wall clock is kept (a late wake-up is not a delay
# of the engine: the next steps catch up); further behind, the engine really is late (CPU-bound)
# and restarts from now.
_CATCH_UP_S = 0.02
_MIN_SLEEP_S = 0.0005
_YIELD_EVERY_S = 0.001
# asyncio timers fire late (1 ms epoll resolution, more on a busy host): sleep less by a running
# estimate of the lateness, bounded so a stall never makes the engine run early by much.
_MAX_LATE_S = 0.005


class SimEngine:
    """One simulated vLLM 0.24 V1 engine core (implements ``types.EngineCore``)."""

    def __init__(
        self,
        config: SimConfig,
        stats: StatsListener | None = None,
        event_sink: EventSink | None = None,
    ) -> None:
        self.config = config
        self.block_size = config.block_size
        self.num_gpu_blocks = config.num_gpu_blocks
        self.max_model_len = config.max_model_len
        self._stats = stats
        self._sink = event_sink
        self.kv = KVCache(
            config.num_gpu_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching
        )
        lm = config.lmcache
        self.lmcache = LMCacheConnector(lm, config.model, config.hash_seed) if lm.enabled else None
        lora = config.lora
        self.lora_slots = AdapterSlots(lora.max_loras, lora.cpu_capacity) if lora.enabled else None
        self.scheduler = Scheduler(
            self.kv,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            long_prefill_token_threshold=config.long_prefill_token_threshold,
            lmcache_chunk_size=lm.chunk_size if lm.enabled else None,
            lora_slots=self.lora_slots,
        )
        self._none_hash = engine_chain_root(config.block_hash_seed)
        self._reqs: dict[str, Req] = {}
        self._wake = asyncio.Event()
        self._step_loop = BackgroundTask("sim-engine-core", self._run, logger=log)
        self._lookups: set[asyncio.Task[None]] = set()
        self._late = 0.0005
        self.num_steps = 0
        self.num_deferred = 0  # waiting requests the last step skipped for max_loras
        gpu = config.shared_gpu
        self.gpu_peers = GpuPeers(gpu.peers_dir) if gpu.peers_dir is not None else None
        self._share: float | None = None  # this step's GPU share when it varies (shared_gpu)

    # -- EngineCore surface ------------------------------------------------------------------
    async def start(self) -> None:
        if self._step_loop.running:
            return
        if self.lmcache is not None:
            self.lmcache.start()
        self._step_loop.start()

    async def stop(self) -> None:
        lookups = list(self._lookups)
        for t in lookups:
            t.cancel()
        await self._step_loop.stop()
        for t in lookups:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for req in list(self._reqs.values()):
            self.abort(req.request_id)
            self.release(req)
        if self.gpu_peers is not None:
            self.gpu_peers.close()
        if self.lmcache is not None:
            await self.lmcache.stop()

    def generate(self, request: SimRequest) -> AsyncIterator[RequestOutput]:
        """Validate and submit ``request`` now; raises OpenAIError(400) before scheduling anything."""
        req = self._make_req(request)
        self._reqs[req.request_id] = req
        lm = self.lmcache
        if lm is not None and req.lm_hashes:
            n_cpu = lm.cpu.leading(req.lm_hashes)
            if n_cpu < len(req.lm_hashes) and lm.remote is not None and lm.remote.available:
                task = asyncio.get_running_loop().create_task(self._lookup_then_add(req))
                self._lookups.add(task)
                task.add_done_callback(self._lookups.discard)
                return RequestStream(self, req)
            req.lm_tiers = [0] * n_cpu
        self._add(req)
        return RequestStream(self, req)

    def abort(self, request_id: str, reason: FinishReason = "abort") -> None:
        req = self._reqs.get(request_id)
        if req is None:
            return
        if self.scheduler.abort(req, reason):
            req.event.set()
            self._finish(req, time.monotonic())
            self.release(req)  # ended from outside: nothing more for the consumer to decide
            self._wake.set()
        elif reason == "stop" and req.final is not None:
            # It ended in the core (length or EOS) and the server found a stop string in its final
            # output: vLLM's output processor then reports "stop" too.
            req.final.finish_reason = "stop"
            self.release(req)

    def release(self, req: Req) -> None:
        """The consumer is done with ``req``: report its stats once it has ended."""
        req.released = True
        if req.final is None or req.reported:
            return
        req.reported = True
        self._reqs.pop(req.request_id, None)
        if self._stats is not None:
            self._stats.on_request_finished(req.final)

    def add_lora(self, name: str) -> None:
        if self.lora_slots is not None:
            self.lora_slots.add(name)

    def remove_lora(self, name: str) -> None:
        if self.lora_slots is not None:
            self.lora_slots.remove(name)

    def reset_prefix_cache(self) -> bool:
        ok = self.kv.reset()  # like vLLM, LMCache's tiers are left alone
        self._flush_events()
        return ok

    def clear_lmcache_cpu(self) -> int | None:
        lm = self.lmcache
        if lm is None:
            return None
        cleared = lm.clear_cpu()
        self._flush_events()
        if self._stats is not None:
            self._stats.on_lmcache_usage(lm.local_cpu_bytes, lm.cpu.evictions)
        return cleared

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        # vLLM asks the LMCache connector for a waiting request's external hits from inside its
        # scheduler, so a request whose lookup is in flight is in vLLM's waiting queue already.
        return len(self.scheduler.waiting) + len(self._lookups)

    @property
    def kv_cache_usage(self) -> float:
        return self.kv.usage

    # -- submission --------------------------------------------------------------------------
    def _make_req(self, r: SimRequest) -> Req:
        n_prompt = len(r.prompt_token_ids)
        if n_prompt == 0:
            raise OpenAIError(400, "The decoder prompt cannot be empty", param="prompt")
        if r.max_tokens < 1:
            raise OpenAIError(400, f"max_tokens must be at least 1, got {r.max_tokens}.", param="max_tokens")
        # The server checks the same before it calls generate; one wording, vLLM 0.24's.
        check_length(n_prompt, r.max_tokens, self.max_model_len, is_text=False)
        if r.request_id in self._reqs:
            raise OpenAIError(400, f"Request id {r.request_id} is already in use.")
        cfg = self.config
        seed = output_seed(r.prompt_token_ids)
        target, stop = output_length(seed, r.max_tokens, cfg.mean_output_tokens, r.ignore_eos)
        now = time.monotonic()
        arrival = r.arrival_time or now
        req = Req(
            request_id=r.request_id,
            tokens=list(r.prompt_token_ids),
            num_prompt=n_prompt,
            target_len=target,
            ends_with_stop=stop,
            seed=seed,
            root=self._none_hash,
            lora_name=r.lora_name,
            lora_id=r.lora_id,
            cache_salt=r.cache_salt,
            ready_at=arrival + engine_frontend_delay(cfg, n_prompt) / cfg.speed,
            max_tokens=r.max_tokens,
            n=r.n,
            arrival=arrival,
        )
        lm = self.lmcache
        if lm is not None and n_prompt >= lm.cfg.chunk_size:
            req.lm_hashes = chunk_hashes(
                r.prompt_token_ids, lm.cfg.chunk_size, lm.root(r.lora_name, r.cache_salt)
            )
        return req

    async def _lookup_then_add(self, req: Req) -> None:
        assert self.lmcache is not None
        req.lm_tiers = await self.lmcache.lookup(req.lm_hashes)
        if not req.finished:
            self._add(req)

    def _add(self, req: Req) -> None:
        self.scheduler.add(req)
        self._wake.set()

    # -- the loop ----------------------------------------------------------------------------
    async def _run(self) -> None:
        sched = self.scheduler
        speed = self.config.speed
        config = self.config
        clock = 0.0
        last_yield = time.monotonic()
        while True:
            if not sched.has_work:
                self._set_busy(False)
                self._wake.clear()
                await self._wake.wait()
                last_yield = time.monotonic()
                continue
            now = time.monotonic()
            start = clock if clock >= now - _CATCH_UP_S else now
            if not sched.running and sched.waiting:
                # Idle until the head clears its front-end delay: start the step right then.
                start = max(start, sched.waiting[0].ready_at)
            plan = sched.schedule(start)
            if not plan.scheduled:
                self._set_busy(False)
                self._report_preemptions(plan)
                # Nothing fits (no free blocks) or nothing is ready: wait for a change.
                self._wake.clear()
                head = sched.waiting[0].ready_at if sched.waiting else now
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(head - now, 0.001)):
                        await self._wake.wait()
                last_yield = time.monotonic()
                continue
            self._set_busy(True)
            self._on_scheduled(plan, start)
            clock = start + engine_step_time(config, plan.work, self._share) / speed
            before = time.monotonic()
            delay = clock - before - self._late
            if delay >= _MIN_SLEEP_S:
                await asyncio.sleep(delay)
                last_yield = time.monotonic()
                late = min(max(last_yield - before - delay, 0.0), _MAX_LATE_S)
                self._late += 0.2 * (late - self._late)
            elif before - last_yield >= _YIELD_EVERY_S:
                await asyncio.sleep(0)
                last_yield = time.monotonic()
            self._complete(plan, clock)

    def _set_busy(self, busy: bool) -> None:
        """Mark this engine busy or idle on its simulated GPU; when busy, read this step's share."""
        peers = self.gpu_peers
        if peers is None:
            return
        peers.set_busy(busy)
        if busy:
            self._share = share_for(peers.count(), self.config.shared_gpu.share_by_busy)

    def _on_scheduled(self, plan: StepPlan, start: float) -> None:
        self.num_steps += 1
        self.num_deferred = plan.deferred
        stats = self._stats
        for adm in plan.admitted:
            req = cast(Req, adm.seq)
            if req.scheduled_at is None:
                req.scheduled_at = start
            if stats is None:
                continue
            stats.on_prefix_cache_query(adm.queried, adm.local_hit)
            if self.lmcache is not None:
                stats.on_external_cache_query(adm.queried, adm.external.tokens)
        self._report_preemptions(plan)
        if stats is not None and self.lora_slots is not None:
            sched = self.scheduler
            running = [s.lora_name for s in sched.running if s.lora_name]
            waiting = [s.lora_name for s in sched.waiting if s.lora_name]
            stats.on_lora_step(
                list(dict.fromkeys(running)), list(dict.fromkeys(waiting)), plan.work.lora_swaps
            )
        if self.lmcache is not None:
            for run in plan.stores:
                self.lmcache.store(run)
            if stats is not None:
                self._report_lmcache(plan, stats, self.lmcache)

    def _report_lmcache(self, plan: StepPlan, stats: StatsListener, lm: LMCacheConnector) -> None:
        """LMCache's own stats of the step: each request's load, each run's store, the CPU tier."""
        config = self.config
        for adm in plan.admitted:
            ext = adm.external
            if ext.asked_tokens:
                loaded = retrieve_time(config, ext.cpu_tokens, ext.remote_load_tokens, self._share)
                seconds = loaded / config.speed
                stats.on_lmcache_retrieve(ext.asked_tokens, ext.tokens, seconds)
        for run in plan.stores:
            tokens = (run.end - run.first) * lm.cfg.chunk_size
            stats.on_lmcache_store(tokens, store_time(config, tokens, self._share) / config.speed)
        if plan.stores or plan.admitted:
            stats.on_lmcache_usage(lm.local_cpu_bytes, lm.cpu.evictions)

    def _report_preemptions(self, plan: StepPlan) -> None:
        if self._stats is not None:
            for _ in plan.preempted:
                self._stats.on_preemption()

    def _complete(self, plan: StepPlan, now: float) -> None:
        # Token times are the step's simulated end (wall-clock seconds), not the moment the loop
        # got to run: stats then follow the model, whatever the host's timer jitter.
        stats = self._stats
        outputs = self.scheduler.update(plan)
        prompt_tokens = 0
        for seq in outputs:
            req = cast(Req, seq)
            req.pending.append(req.tokens[-1])
            if req.first_token_at is None:
                req.first_token_at = now
                prompt_tokens += req.num_prompt
                if stats is not None:
                    # vLLM counts a prompt, by source, with its first token (IterationStats).
                    cached, ext = req.num_cached_tokens, req.num_external_tokens
                    stats.on_prompt_tokens(req.num_prompt - cached, cached - ext, ext)
            else:
                req.itls.append(now - req.last_token_at)
            req.last_token_at = now
            req.event.set()
            if req.finished:
                self._finish(req, now)
        if outputs and stats is not None:
            # One token per request that produced output; a step of prefill chunks alone has none.
            stats.on_iteration(prompt_tokens, len(outputs))
        self._flush_events()

    def _flush_events(self) -> None:
        events = self.kv.take_events()
        if self.lmcache is not None:
            # vLLM publishes the connector's events in the same batch as the step's own.
            events.extend(self.lmcache.take_events())
        if events and self._sink is not None:
            self._sink(events)

    def _finish(self, req: Req, now: float) -> None:
        """Freeze the stats of a request that just ended; reported when its stream is released."""
        if req.final is None:
            req.final = finished_stats(req, now)
            if req.released:
                self.release(req)
