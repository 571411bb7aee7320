"""The V1 scheduler as a pure step function: batching limits, chunked prefill, preemption, abort."""

from __future__ import annotations

import pytest

from kvstack.engine.sim.generator import STOP_TOKEN_ID
from kvstack.engine.sim.kv_cache import KVCache
from kvstack.engine.sim.scheduler import Scheduler, SimSeq, StepPlan

BS = 4


def seq(
    rid: str, prompt: int | list[int], out: int = 3, *, stop: bool = False, ready_at: float = 0.0
) -> SimSeq:
    if isinstance(prompt, int):  # distinct per request id, so requests share no blocks
        base = sum(map(ord, rid)) * 977
        tokens = [300 + (base + 31 * i) % 9000 for i in range(prompt)]
    else:
        tokens = list(prompt)
    return SimSeq(
        request_id=rid,
        tokens=tokens,
        num_prompt=len(tokens),
        target_len=out,
        ends_with_stop=stop,
        seed=17,
        root=5,
        ready_at=ready_at,
    )


def make(num_blocks: int = 64, seqs: int = 8, budget: int = 64, threshold: int = 0) -> Scheduler:
    return Scheduler(
        KVCache(num_blocks, BS),
        max_num_seqs=seqs,
        max_num_batched_tokens=budget,
        long_prefill_token_threshold=threshold,
    )


def step(s: Scheduler, now: float = 0.0) -> tuple[StepPlan, list[SimSeq]]:
    plan = s.schedule(now)
    return plan, s.update(plan)


def scheduled(plan: StepPlan) -> dict[str, int]:
    return {q.request_id: n for q, n in plan.scheduled}


def first_step(s: Scheduler, prompts: list[int]) -> StepPlan:
    """The plan of ``s``'s first step after prompts of these lengths (requests r0, r1, ...) arrive."""
    for i, n in enumerate(prompts):
        s.add(seq(f"r{i}", n))
    return s.schedule(0.0)


@pytest.mark.parametrize(
    ("max_seqs", "budget", "prompts", "expected"),
    [
        (8, 64, [6, 6, 6], {"r0": 6, "r1": 6, "r2": 6}),
        (2, 64, [6, 6, 6], {"r0": 6, "r1": 6}),  # max_num_seqs
        (8, 10, [6, 6, 6], {"r0": 6, "r1": 4}),  # token budget; the second is chunked
        (8, 10, [25], {"r0": 10}),  # chunked prefill of a long prompt
        (8, 12, [4, 30, 4], {"r0": 4, "r1": 8}),  # FIFO: the third does not jump the second
    ],
)
def test_first_step_respects_limits(
    max_seqs: int, budget: int, prompts: list[int], expected: dict[str, int]
) -> None:
    s = make(seqs=max_seqs, budget=budget)
    plan = first_step(s, prompts)
    assert scheduled(plan) == expected
    assert plan.work.prefill_tokens == sum(expected.values())
    assert len(s.running) == len(expected)
    assert [q.request_id for q in s.waiting] == [f"r{i}" for i in range(len(expected), len(prompts))]


def test_chunked_prefill_samples_only_after_the_last_chunk() -> None:
    s = make(budget=10)
    s.add(seq("long", 25, out=2))
    sizes = []
    for _ in range(3):
        plan, out = step(s)
        sizes.append(scheduled(plan)["long"])
        assert (out != []) is (sum(sizes) == 25)
    assert sizes == [10, 10, 5]
    plan, out = step(s)
    assert scheduled(plan) == {"long": 1}
    assert plan.work.decodes == 1 and plan.work.prefill_tokens == 0
    assert out[0].finished and out[0].finish_reason == "length"
    assert s.running == [] and s.kv.num_used == 0


def test_running_decodes_come_before_new_prefills() -> None:
    s = make(budget=8)
    s.add(seq("a", 4, out=5))
    step(s)
    s.add(seq("b", 20))
    plan, _ = step(s)
    assert plan.scheduled[0][0].request_id == "a"
    assert scheduled(plan) == {"a": 1, "b": 7}


# -- long_prefill_token_threshold (vLLM's --long-prefill-token-threshold) ---------------------------


@pytest.mark.parametrize(
    ("budget", "threshold", "prompts", "expected"),
    [
        (32, 0, [40, 4], {"r0": 32}),  # off: the long prompt takes the whole budget, the short waits
        (32, 8, [40, 4], {"r0": 8, "r1": 4}),  # capped on admission: the short one joins the step
        (32, 8, [40, 40, 4], {"r0": 8, "r1": 8, "r2": 4}),  # every long prompt is capped
        (32, 8, [9, 8, 7], {"r0": 8, "r1": 8, "r2": 7}),  # only what exceeds the threshold is cut
        (12, 8, [40, 40], {"r0": 8, "r1": 4}),  # min(threshold, what is left of the budget)
        (6, 8, [40], {"r0": 6}),  # a budget below the threshold still wins
        (32, 100, [40, 4], {"r0": 32}),  # above the budget: no effect (vLLM accepts it)
    ],
)
def test_long_prefill_threshold_caps_admitted_prompts(
    budget: int, threshold: int, prompts: list[int], expected: dict[str, int]
) -> None:
    plan = first_step(make(budget=budget, threshold=threshold), prompts)
    assert scheduled(plan) == expected
    assert plan.num_tokens == plan.work.prefill_tokens == sum(expected.values())


@pytest.mark.parametrize(
    ("threshold", "steps"),
    [
        # off: the running prefill takes the whole budget; the short prompt waits for all of it
        (0, [{"long": 16}, {"long": 16}, {"long": 8, "short": 4}, {"long": 1, "short": 1}]),
        # T=6: the running prefill advances 6 a step; the short prompt is scheduled in the same step
        (6, [{"long": 6}, {"long": 6, "short": 4}, {"long": 6, "short": 1}, {"long": 6, "short": 1}]),
        # T=12: the running prefill's cap comes before the budget (12, then 12 + 4 = 16)
        (12, [{"long": 12}, {"long": 12, "short": 4}, {"long": 12, "short": 1}, {"long": 4, "short": 1}]),
    ],
)
def test_long_prefill_threshold_caps_a_running_prefill(threshold: int, steps: list[dict[str, int]]) -> None:
    s = make(budget=16, threshold=threshold)
    s.add(seq("long", 40, out=2))
    got = [scheduled(step(s)[0])]
    s.add(seq("short", 4, out=4))  # arrives behind the long prefill, which is now running
    got += [scheduled(step(s)[0]) for _ in range(3)]
    assert got == steps


def test_long_prefill_threshold_chunks_until_the_prompt_is_done_then_decodes() -> None:
    s = make(budget=64, threshold=6)
    s.add(seq("long", 25, out=2))
    sizes, sampled = [], []
    while s.has_work:
        plan, out = step(s)
        sizes.append(scheduled(plan)["long"])
        sampled.append(out != [])
    assert sizes == [6, 6, 6, 6, 1, 1]  # 25 = 4 x 6 + 1, then the one decode
    assert sampled == [False, False, False, False, True, True]


def test_long_prefill_threshold_leaves_decodes_at_one_token() -> None:
    s = make(budget=64, threshold=2)
    s.add(seq("a", 4, out=5))
    assert [scheduled(step(s)[0]) for _ in range(2)] == [{"a": 2}, {"a": 2}]  # the prompt, 2 a step
    s.add(seq("b", 6))
    plan, _ = step(s)
    assert scheduled(plan) == {"a": 1, "b": 2}  # a's decode is one token; b's prefill is capped
    assert (plan.work.decodes, plan.work.prefill_tokens) == (1, 2)


def test_long_prefill_threshold_counts_the_tokens_after_a_prefix_hit() -> None:
    s = make(budget=64, threshold=4)
    prompt = list(range(300, 318))  # 4 full blocks and 2 tokens
    s.add(seq("first", prompt, out=1))
    assert [scheduled(step(s)[0])["first"] for _ in range(5)] == [4, 4, 4, 4, 2]
    s.add(seq("second", [*prompt[:12], 7, 7, 7, 7, 7, 7], out=1))
    plan, _ = step(s)
    assert plan.admitted[0].local_hit == 12
    assert scheduled(plan) == {"second": 4}  # 6 new tokens after the 12-token hit, cut to 4
    assert scheduled(step(s)[0]) == {"second": 2}


def test_ready_at_holds_a_request_back() -> None:
    s = make()
    s.add(seq("later", 4, ready_at=5.0))
    assert s.schedule(1.0).scheduled == []
    assert scheduled(s.schedule(5.0)) == {"later": 4}


def test_prefix_hit_starts_computed_tokens_at_the_hit() -> None:
    s = make()
    prompt = list(range(300, 318))  # 4 full blocks and 2 tokens
    s.add(seq("first", prompt, out=1))
    step(s)
    s.add(seq("second", [*prompt[:12], 7, 7, 7, 7, 7, 7], out=1))
    plan, _ = step(s)
    (adm,) = plan.admitted
    assert (adm.queried, adm.local_hit, adm.first_time) == (18, 12, True)
    assert scheduled(plan) == {"second": 6}
    assert adm.seq.num_cached_tokens == 12


@pytest.mark.parametrize(
    ("prompt_len", "hit", "computed"),
    [
        (16, 12, 4),  # a full hit on block-aligned prompt recomputes the whole last block
        (18, 16, 2),  # the partial tail is computed; every full block hits
        (17, 16, 1),  # a full hit computes the last prompt token
    ],
)
def test_full_hit_still_computes_the_last_token(prompt_len: int, hit: int, computed: int) -> None:
    s = make()
    prompt = list(range(400, 400 + prompt_len))
    s.add(seq("a", prompt, out=1))
    step(s)
    s.add(seq("b", prompt, out=1))
    plan, out = step(s)
    assert plan.admitted[0].local_hit == hit
    assert scheduled(plan) == {"b": computed}
    assert [q.request_id for q in out] == ["b"]


def test_preemption_of_the_most_recent_request_and_recompute() -> None:
    # 6 blocks of 4 tokens; two requests of 8 prompt tokens each grow until they collide.
    s = make(num_blocks=6, budget=64)
    a, b = seq("a", 8, out=8), seq("b", 8, out=8)
    s.add(a)
    s.add(b)
    step(s)  # both prefilled: 4 blocks used, tokens 9 each
    preempted: list[str] = []
    for _ in range(40):
        plan, _ = step(s)
        preempted += [q.request_id for q in plan.preempted]
        if not s.has_work:
            break
    assert preempted and set(preempted) == {"b"}  # the later one is the victim
    assert s.num_preemptions == len(preempted) and b.num_preemptions == len(preempted)
    assert a.finished and b.finished
    assert a.num_generated == b.num_generated == 8
    assert s.kv.num_used == 0


def test_preempted_request_goes_back_to_the_front_of_the_waiting_queue() -> None:
    s = make(num_blocks=5, budget=64)
    s.add(seq("a", 8, out=8))
    s.add(seq("b", 8, out=8))
    step(s)
    s.add(seq("c", 4))
    for _ in range(10):
        plan = s.schedule(0.0)
        s.update(plan)
        if plan.preempted:
            assert not plan.admitted  # no new request in a step that had to preempt
            assert [q.request_id for q in s.waiting][:2] == ["b", "c"]
            return
    pytest.fail("no preemption happened")


def test_abort_frees_blocks_wherever_the_request_is() -> None:
    s = make(seqs=1)
    a, b = seq("a", 8, out=5), seq("b", 8)
    s.add(a)
    s.add(b)
    step(s)
    assert s.kv.num_used == 2  # 8 prompt tokens; the sampled 9th gets its block next step
    assert s.abort(a) and a.finish_reason == "abort"
    assert s.running == [] and s.kv.num_used == 0
    assert s.abort(b, "stop") and list(s.waiting) == [] and b.finish_reason == "stop"
    assert not s.abort(b)  # already gone
    assert b.finish_reason == "stop"


def test_abort_during_a_step_drops_its_result() -> None:
    s = make()
    a = seq("a", 4)
    s.add(a)
    plan = s.schedule(0.0)
    s.abort(a)
    assert s.update(plan) == []
    assert s.kv.num_used == 0


@pytest.mark.parametrize(("stop", "reason", "last_is_stop"), [(False, "length", False), (True, "stop", True)])
def test_finish_reason_and_stop_token(stop: bool, reason: str, last_is_stop: bool) -> None:
    s = make()
    q = seq("a", 4, out=3, stop=stop)
    s.add(q)
    while s.has_work:
        step(s)
    assert q.finish_reason == reason
    assert q.num_generated == 3
    assert (q.tokens[-1] == STOP_TOKEN_ID) is last_is_stop


def test_generated_blocks_are_committed_as_they_fill() -> None:
    s = make()
    q = seq("a", 6, out=6)
    s.add(q)
    while s.has_work:
        step(s)
    # 6 prompt + 6 generated tokens: the last token is sampled but never computed, so 11 tokens
    # have KV: two full blocks committed.
    assert q.num_committed == 2
    assert s.kv.num_cached == 2
