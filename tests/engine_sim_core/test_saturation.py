"""The V1 scheduler at saturation, as tables: FCFS waiting queue, the token budget, max_num_seqs and
KV preemption (recompute), checked step by step against vLLM V1's rules.

vLLM V1 (``vllm/v1/core/sched/scheduler.py``): running requests are scheduled first, each its whole
remaining work or what is left of ``max_num_batched_tokens``; when blocks run out the last running
request is preempted (its blocks freed, back to the front of the waiting queue, recomputed later) and
no waiting request is admitted in that step; waiting requests are admitted in arrival order while
fewer than ``max_num_seqs`` run, and the first that does not fit stops the queue (no skipping).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kvstack.engine.sim.kv_cache import KVCache
from kvstack.engine.sim.scheduler import Scheduler, SimSeq

from .test_scheduler import BS, seq


@dataclass(frozen=True)
class Trace:
    """What a scheduler did, step by step, until every request finished."""

    waiting: list[int]  # len(waiting) after each schedule()
    running: list[int]  # len(running) after each schedule()
    tokens: list[int]  # tokens scheduled per step
    usage: list[float]  # KV usage after each schedule()
    first_token_step: dict[str, int]
    preemptions: int
    generated: dict[str, int]
    blocks_left: int


def drive(num_blocks: int, max_seqs: int, budget: int, requests: list[SimSeq], limit: int = 500) -> Trace:
    s = Scheduler(KVCache(num_blocks, BS), max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    for r in requests:
        s.add(r)
    waiting, running, tokens, usage = [], [], [], []
    first: dict[str, int] = {}
    for i in range(limit):
        if not s.has_work:
            break
        plan = s.schedule(0.0)
        waiting.append(len(s.waiting))
        running.append(len(s.running))
        tokens.append(plan.num_tokens)
        usage.append(s.kv.usage)
        for out in s.update(plan):
            first.setdefault(out.request_id, i)
    else:
        pytest.fail("the scheduler did not drain its queue")
    return Trace(
        waiting,
        running,
        tokens,
        usage,
        first,
        s.num_preemptions,
        {r.request_id: r.num_generated for r in requests},
        s.kv.num_used,
    )


def burst(n: int, prompt: int, out: int) -> list[SimSeq]:
    return [seq(f"r{i}", prompt, out=out) for i in range(n)]


# Exact step-by-step queues for small cases (prompts of 4 tokens = 1 block, 2 output tokens).
EXACT = [
    # id, blocks, max_num_seqs, budget, requests, waiting per step, running per step, tokens per step
    (
        "max_num_seqs bounds the batch",
        64,
        2,
        64,
        burst(5, 4, 2),
        [3, 3, 1, 1, 0, 0],
        [2, 2, 2, 2, 1, 1],
        [8, 2, 8, 2, 4, 1],
    ),
    # budget 6: the second prompt is chunked (2 of 4 tokens), the third waits for room in the budget
    ("the token budget chunks prefills", 64, 8, 6, burst(3, 4, 2), [1, 0, 0, 0], [2, 3, 2, 1], [6, 6, 2, 1]),
    # 3 blocks, one per prompt: each decode then needs a second block. Step 2: r0 grows by
    # preempting the last running request (r2), then r1 finds no block and is its own victim; both
    # go back to the front of the queue (r1 first), no new admission in that step. Step 3: r1 comes
    # back on its own cached prompt block (1 token to compute); r2's cached block was taken for
    # r1's new one, so step 4 recomputes r2's 4 prompt tokens and its generated one (5).
    ("the KV cache bounds the batch", 3, 8, 64, burst(3, 4, 2), [0, 2, 1, 0], [3, 1, 1, 1], [12, 1, 1, 5]),
]


@pytest.mark.parametrize(
    ("blocks", "max_seqs", "budget", "requests", "waiting", "running", "tokens"),
    [pytest.param(*c[1:], id=c[0]) for c in EXACT],
)
def test_queues_step_by_step(
    blocks: int,
    max_seqs: int,
    budget: int,
    requests: list[SimSeq],
    waiting: list[int],
    running: list[int],
    tokens: list[int],
) -> None:
    t = drive(blocks, max_seqs, budget, requests)
    assert (t.waiting, t.running, t.tokens) == (waiting, running, tokens)


# Overload invariants: many more requests than the engine holds, every limit binding in turn.
OVERLOAD = [
    # id, blocks, max_num_seqs, budget, n, prompt, out, preempts
    ("seq-bound", 1024, 4, 256, 24, 12, 6, False),
    ("budget-bound", 1024, 64, 16, 24, 12, 6, False),
    ("kv-bound, preempting", 24, 64, 256, 24, 12, 12, True),
    ("everything binds", 20, 6, 20, 30, 10, 10, True),
]


@pytest.mark.parametrize(
    ("blocks", "max_seqs", "budget", "n", "prompt", "out", "preempts"),
    [pytest.param(*c[1:], id=c[0]) for c in OVERLOAD],
)
def test_overload_invariants(
    blocks: int, max_seqs: int, budget: int, n: int, prompt: int, out: int, preempts: bool
) -> None:
    t = drive(blocks, max_seqs, budget, burst(n, prompt, out))
    assert max(t.running) <= max_seqs
    assert max(t.tokens) <= budget
    assert max(t.usage) <= 1.0
    # the queue only drains: nothing arrives after the burst, FCFS admission never reorders it
    assert t.waiting[0] > 0 and t.waiting[-1] == 0
    # first tokens in arrival order (FCFS): a later request never gets its first token earlier
    steps = [t.first_token_step[f"r{i}"] for i in range(n)]
    assert steps == sorted(steps)
    assert (t.preemptions > 0) == preempts
    # nothing lost: every request produced all its tokens, and every block came back
    assert t.generated == {f"r{i}": out for i in range(n)}
    assert t.blocks_left == 0


def test_kv_bound_batch_fills_the_cache() -> None:
    """Under overload with the KV cache binding, usage reaches 1.0 (vllm:kv_cache_usage_perc) while
    requests wait (vllm:num_requests_waiting > 0), as on a saturated GPU."""
    t = drive(24, 64, 256, burst(24, 12, 12))
    saturated = [u for u, w in zip(t.usage, t.waiting, strict=True) if w > 0]
    assert max(saturated) == 1.0


def test_head_of_line_blocking_no_skipping() -> None:
    """A waiting request too large for the free blocks stops the queue: a small one behind it waits
    (vLLM V1 breaks out of the waiting loop; it does not skip ahead)."""
    s = Scheduler(KVCache(6, BS), max_num_seqs=8, max_num_batched_tokens=64)
    s.add(seq("running", 12, out=20))
    s.schedule(0.0)  # 3 blocks held, 3 free
    s.add(seq("big", 16))  # needs 4 blocks
    s.add(seq("small", 4))  # needs 1
    plan = s.schedule(0.0)
    assert [q.request_id for q, _ in plan.scheduled] == ["running"]
    assert [q.request_id for q in s.waiting] == ["big", "small"]


def test_preempted_request_keeps_its_tokens_and_recomputes_them() -> None:
    """Recompute preemption: the victim's generated tokens are kept, its computed count goes to 0, and
    readmission recomputes prompt + output (a prefix hit on its own freed blocks when still cached)."""
    s = Scheduler(KVCache(6, BS), max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq("a", 8, out=12), seq("b", 8, out=12)
    s.add(a)
    s.add(b)
    for _ in range(40):
        before = b.num_generated
        plan = s.schedule(0.0)
        if plan.preempted:
            assert plan.preempted == [b]
            assert b.num_computed == 0 and not b.blocks and b.num_generated == before
            assert s.waiting[0] is b
            break
        s.update(plan)
    else:
        pytest.fail("no preemption happened")
