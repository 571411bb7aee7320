"""vLLM V1 continuous batching over the simulated KV cache (pure: no clock, no I/O).

One :meth:`Scheduler.schedule` call plans a step: running requests first (a decode is one token,
an unfinished chunked prefill continues), then waiting requests in FIFO order, within
``max_num_seqs`` and ``max_num_batched_tokens``. With ``long_prefill_token_threshold`` T > 0
(vLLM's ``--long-prefill-token-threshold``) a running or admitted request computes at most T tokens
a step, cut before the budget, so a long prefill leaves room for others in its steps. A request's
prefix-cache hit is looked up when it is scheduled from the waiting queue; like vLLM, the hit stops
short of the last prompt token, so at least that token (in practice its whole block) is computed.
When blocks run out the most recently added running request is preempted: its blocks are freed and
it goes back to the front of the waiting queue, to be recomputed later. :meth:`Scheduler.update`
then applies the step.

LoRA (``max_loras`` set): a step holds at most ``max_loras`` distinct adapters. A waiting request
whose adapter would be one too many is skipped (it keeps its place; later ones may go first), as
vLLM V1 defers it; the step's adapters are then made resident in the GPU slots, and any copy that
takes is charged to the step (:class:`kvstack.engine.sim.lora.AdapterSlots`).
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

from kvstack.engine.sim.generator import STOP_TOKEN_ID, token_at
from kvstack.engine.sim.kv_cache import KVCache, extend_hashes
from kvstack.engine.sim.latency import StepWork
from kvstack.engine.sim.lmcache import ChunkRun, ExternalPlan, plan_external
from kvstack.engine.sim.lora import AdapterSlots
from kvstack.engine.sim.types import FinishReason


@dataclass(slots=True, eq=False)
class SimSeq:
    """A request inside the engine: its tokens so far and where its KV lives."""

    request_id: str
    tokens: list[int]  # prompt, then generated tokens
    num_prompt: int
    target_len: int  # output tokens this request will generate
    ends_with_stop: bool  # the last generated token is EOS ("stop"), else "length"
    seed: int  # output seed (generator)
    root: int  # parent hash of the first block (the per-process NONE_HASH)
    lora_name: str | None = None  # an extra key of every block
    lora_id: int | None = None  # the adapter's int id, carried by its KV events
    cache_salt: str | None = None  # an extra key of the first block
    block_hashes: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_committed: int = 0  # leading blocks already cached (hit or committed)
    ready_at: float = 0.0  # simulated front-end delay: not schedulable before this (monotonic)
    # LMCache
    lm_hashes: list[int] = field(default_factory=list)
    lm_tiers: list[int] = field(default_factory=list)  # tiers of the leading chunks it holds
    lm_stored: int = 0  # leading chunks already offloaded
    # outcome
    started: bool = False  # prefill began once (prompt-token sources reported)
    num_cached_tokens: int = 0
    num_external_tokens: int = 0
    num_preemptions: int = 0
    finished: bool = False
    finish_reason: FinishReason | None = None

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt


@dataclass(slots=True)
class Admission:
    """A request scheduled from the waiting queue this step, with its cache hits."""

    seq: SimSeq
    queried: int  # tokens looked up
    local_hit: int
    external: ExternalPlan
    first_time: bool  # False when it resumes after a preemption


@dataclass(slots=True)
class StepPlan:
    """The decisions of one step."""

    scheduled: list[tuple[SimSeq, int]] = field(default_factory=list)
    work: StepWork = field(default_factory=StepWork)
    admitted: list[Admission] = field(default_factory=list)
    preempted: list[SimSeq] = field(default_factory=list)
    stores: list[ChunkRun] = field(default_factory=list)  # LMCache chunks to offload
    loras: set[str] = field(default_factory=set)  # adapters of the scheduled requests
    deferred: int = 0  # waiting requests skipped because their adapter exceeded max_loras

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    """Running and waiting queues over one :class:`KVCache`."""

    def __init__(
        self,
        kv: KVCache,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        long_prefill_token_threshold: int = 0,
        lmcache_chunk_size: int | None = None,
        lora_slots: AdapterSlots | None = None,
    ) -> None:
        self.kv = kv
        self.lora_slots = lora_slots
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold  # 0: off
        self.lmcache_chunk_size = lmcache_chunk_size
        self.running: list[SimSeq] = []
        self.waiting: deque[SimSeq] = deque()
        self.num_preemptions = 0

    def add(self, seq: SimSeq) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # -- planning ------------------------------------------------------------------------
    def schedule(self, now: float) -> StepPlan:
        """Plan one step starting at ``now`` (waiting requests with ``ready_at > now`` wait)."""
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = self._num_new_tokens(len(seq.tokens) - seq.num_computed, budget)
            if not self._grow(seq, n):
                # Out of blocks: preempt from the back until this request fits (or is the victim).
                while True:
                    victim = running.pop()
                    self._preempt(victim, plan)
                    if victim is seq or self._grow(seq, n):
                        break
                if victim is seq:
                    break
            self._account(seq, n, plan)
            if seq.lora_name:
                plan.loras.add(seq.lora_name)
            budget -= n
            i += 1
        if not plan.preempted:  # vLLM schedules no new request in a step that had to preempt
            self._schedule_waiting(now, budget, plan)
        if self.lora_slots is not None and plan.loras:
            act = self.lora_slots.activate(sorted(plan.loras))
            plan.work.lora_swaps += act.swaps
            plan.work.lora_disk_loads += act.disk_loads
        return plan

    def _schedule_waiting(self, now: float, budget: int, plan: StepPlan) -> None:
        waiting, running, loras = self.waiting, self.running, plan.loras
        max_loras = self.lora_slots.max_loras if self.lora_slots is not None else None
        skipped: list[SimSeq] = []
        while waiting and budget > 0 and len(running) < self.max_num_seqs:
            seq = waiting[0]
            if seq.ready_at > now:
                break
            lora = seq.lora_name
            if max_loras is not None and lora and lora not in loras and len(loras) >= max_loras:
                skipped.append(waiting.popleft())  # one adapter too many for this step
                continue
            admission = self._admit(seq, budget, plan)
            if admission is None:
                break
            waiting.popleft()
            running.append(seq)
            if lora:
                loras.add(lora)
            budget -= plan.scheduled[-1][1]
        plan.deferred = len(skipped)
        waiting.extendleft(reversed(skipped))

    def _num_new_tokens(self, remaining: int, budget: int) -> int:
        """What a request computes this step: its ``remaining`` tokens, cut to the long-prefill
        threshold when that is on, then to the step's ``budget`` (vLLM V1, in both loops)."""
        threshold = self.long_prefill_token_threshold
        if 0 < threshold < remaining:
            remaining = threshold
        return min(remaining, budget)

    def _grow(self, seq: SimSeq, n: int) -> bool:
        """Allocate blocks so ``seq`` can compute ``n`` more tokens; commit the full ones."""
        bs = self.kv.block_size
        need = -(-(seq.num_computed + n) // bs) - len(seq.blocks)
        if need > 0:
            if not self.kv.can_allocate((), need):
                return False
            seq.blocks.extend(self.kv.allocate(need))
        self._commit(seq, seq.num_computed + n)
        return True

    def _commit(self, seq: SimSeq, upto_tokens: int) -> None:
        kv = self.kv
        if not kv.enable_prefix_caching:
            return
        full = upto_tokens // kv.block_size
        if full <= seq.num_committed:
            return
        extend_hashes(
            seq.block_hashes, seq.tokens, upto_tokens, kv.block_size, seq.root, seq.lora_name, seq.cache_salt
        )
        kv.commit(
            seq.blocks,
            seq.block_hashes,
            seq.num_committed,
            full,
            seq.tokens,
            seq.lora_name,
            seq.cache_salt,
            lora_id=seq.lora_id,
        )
        seq.num_committed = full

    def _admit(self, seq: SimSeq, budget: int, plan: StepPlan) -> Admission | None:
        kv = self.kv
        bs = kv.block_size
        num_tokens = len(seq.tokens)
        hit: list[int] = []
        if kv.enable_prefix_caching:
            extend_hashes(
                seq.block_hashes, seq.tokens, num_tokens, bs, seq.root, seq.lora_name, seq.cache_salt
            )
            hit = kv.find_prefix(seq.block_hashes, (num_tokens - 1) // bs)
        local = len(hit) * bs
        ext = ExternalPlan()
        if self.lmcache_chunk_size and seq.lm_tiers:
            ext = plan_external(local, seq.lm_tiers, self.lmcache_chunk_size, num_tokens)
        computed = local + ext.tokens
        n = self._num_new_tokens(num_tokens - computed, budget)
        need = -(-(computed + n) // bs) - len(hit)
        if not kv.can_allocate(hit, need):
            return None
        kv.touch(hit)
        seq.blocks = [*hit, *kv.allocate(need)]
        seq.num_committed = len(hit)
        seq.num_computed = computed
        first_time = not seq.started
        if first_time:
            seq.started = True
            seq.num_cached_tokens = local + ext.tokens
            seq.num_external_tokens = ext.tokens
        self._commit(seq, computed + n)
        plan.work.cpu_load_tokens += ext.cpu_tokens
        plan.work.remote_load_tokens += ext.remote_load_tokens  # a failed load costs its attempt
        admission = Admission(seq, num_tokens, local, ext, first_time)
        plan.admitted.append(admission)
        self._account(seq, n, plan)
        return admission

    def _account(self, seq: SimSeq, n: int, plan: StepPlan) -> None:
        plan.scheduled.append((seq, n))
        start = seq.num_computed
        if n == 1 and start >= seq.num_prompt and start == len(seq.tokens) - 1:
            plan.work.add_decode(start)
        else:
            plan.work.add_prefill(n, start)
            if start < seq.num_prompt <= start + n and not seq.num_preemptions:
                # The prefill ends in this step: a real LMCache connector stores what it computed
                # now, synchronously (a recompute after preemption finds it stored already).
                plan.work.offloads += 1
                plan.work.offload_tokens += seq.num_prompt - seq.num_cached_tokens
        chunk = self.lmcache_chunk_size
        if chunk:
            # LMCache offloads the prompt's full chunks it does not hold yet, as they are computed.
            done = min(start + n, seq.num_prompt) // chunk
            first = max(seq.lm_stored, len(seq.lm_tiers))
            if done > first and seq.lm_hashes:
                plan.stores.append(ChunkRun(seq.lm_hashes, seq.tokens, first, done))
                plan.work.store_tokens += (done - first) * chunk
                seq.lm_stored = done

    def _preempt(self, seq: SimSeq, plan: StepPlan) -> None:
        self.kv.free(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0
        seq.num_committed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)

    # -- applying ------------------------------------------------------------------------
    def update(self, plan: StepPlan) -> list[SimSeq]:
        """Apply a finished step: advance computed tokens, sample, finish. Returns the requests
        that got a new token (finished ones included, already removed from ``running``)."""
        out: list[SimSeq] = []
        any_finished = False
        for seq, n in plan.scheduled:
            if seq.finished:  # aborted while the step ran
                continue
            seq.num_computed += n
            tokens = seq.tokens
            if seq.num_computed < len(tokens):
                continue  # a chunk of a longer prefill
            pos = len(tokens) - seq.num_prompt
            last = pos + 1 >= seq.target_len
            tokens.append(STOP_TOKEN_ID if last and seq.ends_with_stop else token_at(seq.seed, pos))
            out.append(seq)
            if last:
                seq.finished = True
                seq.finish_reason = "stop" if seq.ends_with_stop else "length"
                self.kv.free(seq.blocks)
                seq.blocks = []
                any_finished = True
        if any_finished:
            self.running = [s for s in self.running if not s.finished]
        return out

    def abort(self, seq: SimSeq, reason: FinishReason = "abort") -> bool:
        """End ``seq`` with ``reason`` wherever it is and free its blocks; False if it already finished."""
        if seq.finished:
            return False
        seq.finished = True
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        else:
            with contextlib.suppress(ValueError):  # in neither: a lookup is still pending
                self.waiting.remove(seq)
        if seq.blocks:
            self.kv.free(seq.blocks)
            seq.blocks = []
        return True
