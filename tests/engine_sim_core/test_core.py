"""SimEngine through its EngineCore surface, on a real event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from kvstack.common.blocks import block_keys, chain_root
from kvstack.common.config import ConfigError, build
from kvstack.common.errors import OpenAIError
from kvstack.common.kv_events import BlockStored, KVEvent
from kvstack.common.tokenizer import apply_chat_template, decode
from kvstack.engine.sim.config import SimConfig
from kvstack.engine.sim.core import SimEngine
from kvstack.engine.sim.generator import STOP_TOKEN_ID
from kvstack.engine.sim.protocol import check_length
from kvstack.engine.sim.types import EngineCore, FinishReason, RequestOutput, SimRequest
from kvstack.router.kvindex.index import KVIndex

from .conftest import Recorder

FAST = 1000.0


def prompt(n: int, salt: int = 0) -> list[int]:
    return [300 + (i * 131 + salt * 7919) % 9000 for i in range(n)]


class Sink:
    def __init__(self) -> None:
        self.batches: list[list[KVEvent]] = []

    def __call__(self, events: Sequence[KVEvent]) -> None:
        self.batches.append(list(events))

    def stored(self) -> list[BlockStored]:
        return [e for b in self.batches for e in b if isinstance(e, BlockStored)]


async def engine_with(**overrides: Any) -> tuple[SimEngine, Recorder, Sink]:
    rec, sink = Recorder(), Sink()
    engine = SimEngine(build(SimConfig, "test config", **{"speed": FAST, **overrides}), rec, sink)
    await engine.start()
    return engine, rec, sink


@pytest.fixture
async def sim() -> AsyncIterator[tuple[SimEngine, Recorder, Sink]]:
    engine, rec, sink = await engine_with(num_gpu_blocks=4096, max_model_len=4096)
    try:
        yield engine, rec, sink
    finally:
        await engine.stop()


async def collect(it: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    return [out async for out in it]


def test_sim_engine_satisfies_the_protocol() -> None:
    engine: EngineCore = SimEngine(build(SimConfig, "test config"))
    assert (engine.block_size, engine.num_gpu_blocks, engine.max_model_len) == (16, 56169, 32768)


def test_config_refuses_a_max_model_len_the_cache_cannot_hold() -> None:
    with pytest.raises(ConfigError, match="max_model_len"):
        build(SimConfig, "test config", num_gpu_blocks=10, max_model_len=4096)


@pytest.mark.parametrize(
    ("n_prompt", "max_tokens", "message"),
    [
        (0, 4, "cannot be empty"),
        (10, 0, "max_tokens must be at least 1"),
        (4096, 1, "your prompt contains 4096 input tokens, for a total of 4097 tokens"),
        (4000, 100, "you requested 100 output tokens and your prompt contains 4000 input tokens"),
    ],
)
async def test_invalid_requests_fail_before_scheduling(
    sim: tuple[SimEngine, Recorder, Sink], n_prompt: int, max_tokens: int, message: str
) -> None:
    engine, rec, _ = sim
    with pytest.raises(OpenAIError) as err:
        engine.generate(SimRequest("bad", prompt(n_prompt), max_tokens))
    assert err.value.status == 400 and message in err.value.message
    assert engine.num_waiting == engine.num_running == 0
    await asyncio.sleep(0.01)
    assert rec.iterations == [] and engine.num_steps == 0


@pytest.mark.parametrize(("n_prompt", "max_tokens"), [(4096, 1), (4000, 100), (5000, 1)])
async def test_too_long_requests_fail_with_the_servers_wording(
    sim: tuple[SimEngine, Recorder, Sink], n_prompt: int, max_tokens: int
) -> None:
    engine, _, _ = sim
    with pytest.raises(OpenAIError) as core:
        engine.generate(SimRequest("long", prompt(n_prompt), max_tokens))
    with pytest.raises(OpenAIError) as server:
        check_length(n_prompt, max_tokens, 4096, is_text=False)
    assert (core.value.status, core.value.message, core.value.param) == (
        400,
        server.value.message,
        "input_tokens",
    )
    assert core.value.message.startswith("This model's maximum context length is 4096 tokens.")


async def test_stream_delivers_every_token_then_finishes(sim: tuple[SimEngine, Recorder, Sink]) -> None:
    engine, rec, _ = sim
    outs = await collect(engine.generate(SimRequest("a", prompt(100), 20, ignore_eos=True)))
    tokens = [t for o in outs for t in o.new_token_ids]
    assert len(tokens) == 20
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert not any(o.finished for o in outs[:-1])
    (st,) = rec.finished
    assert (st.finish_reason, st.prompt_tokens, st.generation_tokens, st.max_tokens) == (
        "length",
        100,
        20,
        20,
    )
    assert st.ttft is not None and st.ttft > 0
    assert len(st.inter_token_latencies) == 19
    assert st.e2e_latency >= st.ttft
    assert st.prefill_kv_computed_tokens == 100
    assert rec.prompt_sources == [(100, 0, 0)]
    # one iteration per output step: the prompt with the first token, then one token a step
    assert rec.iterations == [(100, 1)] + [(0, 1)] * 19
    assert engine.kv_cache_usage == 0.0 and engine.num_running == 0


async def test_iterations_count_steps_with_output_as_vllm_does() -> None:
    engine, rec, _ = await engine_with(num_gpu_blocks=4096, max_model_len=20000, max_num_batched_tokens=4096)
    try:
        long = engine.generate(SimRequest("long", prompt(10000, salt=1), 2, ignore_eos=True))
        short = engine.generate(SimRequest("short", prompt(100, salt=2), 3, ignore_eos=True))
        await asyncio.gather(collect(long), collect(short))
        # steps that only prefilled a chunk of the long prompt produced no output: no iteration
        assert engine.num_steps > len(rec.iterations)
        assert sum(p for p, _ in rec.iterations) == 10100  # each prompt once, with its first token
        assert sum(g for _, g in rec.iterations) == 5
        assert sorted(rec.prompt_sources) == [(100, 0, 0), (10000, 0, 0)]
        # a request aborted before its first token never counts its prompt
        stream = engine.generate(SimRequest("gone", prompt(10000, salt=3), 2, ignore_eos=True))
        await stream.aclose()  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)
        assert len(rec.prompt_sources) == 2 and sum(p for p, _ in rec.iterations) == 10100
        assert [s.finish_reason for s in rec.finished][-1] == "abort"
    finally:
        await engine.stop()


async def test_a_lagging_consumer_gets_tokens_coalesced(sim: tuple[SimEngine, Recorder, Sink]) -> None:
    engine, _, _ = sim
    stream = engine.generate(SimRequest("a", prompt(50), 64, ignore_eos=True))
    await asyncio.sleep(0.05)  # 64 decode steps take ~0.3 ms at this speed
    outs = await collect(stream)
    assert sum(len(o.new_token_ids) for o in outs) == 64
    assert len(outs) < 64


async def test_closing_the_stream_aborts_and_frees_blocks(sim: tuple[SimEngine, Recorder, Sink]) -> None:
    engine, rec, _ = sim
    stream = engine.generate(SimRequest("a", prompt(100), 3000, ignore_eos=True))
    await anext(stream)
    assert engine.num_running == 1 and engine.kv_cache_usage > 0
    await stream.aclose()  # type: ignore[attr-defined]
    assert engine.num_running == 0 and engine.kv_cache_usage == 0.0
    assert rec.finished[0].finish_reason == "abort"
    assert 0 < rec.finished[0].generation_tokens < 3000


async def test_a_cancelled_consumer_aborts(sim: tuple[SimEngine, Recorder, Sink]) -> None:
    engine, rec, _ = sim
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(SimRequest("a", prompt(100), 3000, ignore_eos=True)):
            started.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert engine.num_running == 0
    assert [s.finish_reason for s in rec.finished] == ["abort"]


@pytest.mark.parametrize("reason", ["abort", "stop"])
async def test_abort_by_id_ends_the_stream_with_its_reason(
    sim: tuple[SimEngine, Recorder, Sink], reason: FinishReason
) -> None:
    engine, rec, _ = sim
    stream = engine.generate(SimRequest("r", prompt(10), 3000, ignore_eos=True))
    await anext(stream)
    engine.abort("r", reason)
    outs = await collect(stream)
    assert outs[-1].finished and outs[-1].finish_reason == reason
    assert [s.finish_reason for s in rec.finished] == [reason]
    assert engine.num_running == 0 and engine.kv_cache_usage == 0.0
    engine.abort("r", "abort")  # already finished: nothing changes
    engine.abort("unknown-id")
    assert [s.finish_reason for s in rec.finished] == [reason]


@pytest.mark.parametrize(("then", "reported"), [("stop", "stop"), ("abort", "length"), ("close", "length")])
async def test_stats_wait_for_the_consumer_who_may_still_find_a_stop_string(
    sim: tuple[SimEngine, Recorder, Sink], then: str, reported: FinishReason
) -> None:
    engine, rec, _ = sim
    stream = engine.generate(SimRequest("a", prompt(10), 3, ignore_eos=True))
    while not (out := await anext(stream)).finished:
        pass
    assert out.finish_reason == "length"
    assert rec.finished == []  # the consumer has not released the stream yet
    if then != "close":
        # a stop string in the final output makes it "stop", as in vLLM; a late disconnect does not count
        engine.abort("a", "stop" if then == "stop" else "abort")
    await stream.aclose()  # type: ignore[attr-defined]
    assert [s.finish_reason for s in rec.finished] == [reported]
    assert rec.finished[0].generation_tokens == 3


async def test_kv_events_once_per_step_and_prefix_reuse(sim: tuple[SimEngine, Recorder, Sink]) -> None:
    engine, rec, sink = sim
    p = prompt(100)  # 6 full blocks + 4 tokens
    await collect(engine.generate(SimRequest("a", p, 30, ignore_eos=True)))
    stored = sink.stored()
    assert len(sink.batches) <= engine.num_steps
    assert stored[0].parent_block_hash is None
    assert stored[0].token_ids == p[:96] and len(stored[0].block_hashes) == 6
    # 130 tokens, the last never computed: blocks 7 and 8 fill during decode, one event each.
    assert [len(e.block_hashes) for e in stored] == [6, 1, 1]
    assert stored[1].parent_block_hash == stored[0].block_hashes[-1]
    assert stored[2].parent_block_hash == stored[1].block_hashes[-1]
    assert stored[1].token_ids[:4] == p[96:]
    assert all(0 <= h < 2**64 for e in stored for h in e.block_hashes)
    # Same prompt again: a local hit of all full blocks, nothing new stored for the prompt.
    await collect(engine.generate(SimRequest("b", p, 1, ignore_eos=True)))
    assert rec.prefix_queries[-1] == (100, 96)
    assert rec.prompt_sources[-1] == (4, 96, 0)
    assert sink.stored() == stored
    assert rec.finished[-1].prefill_kv_computed_tokens == 4


async def test_lora_and_salt_reach_the_events_and_the_router_index(
    sim: tuple[SimEngine, Recorder, Sink],
) -> None:
    engine, rec, sink = sim
    p = prompt(64)  # 4 full blocks
    await collect(engine.generate(SimRequest("a", p, 1, lora_name="sql-lora", cache_salt="tenant-a")))
    (stored,) = sink.stored()
    assert stored.lora_name == "sql-lora"
    assert stored.extra_keys == [["sql-lora", "tenant-a"], ["sql-lora"], ["sql-lora"], ["sql-lora"]]
    # the engine's own hash covers the same keys: only the same LoRA and salt hit
    for i, (lora, salt) in enumerate([("sql-lora", "tenant-b"), (None, "tenant-a"), ("sql-lora", None)]):
        await collect(engine.generate(SimRequest(f"miss-{i}", p, 1, lora_name=lora, cache_salt=salt)))
        assert rec.prefix_queries[-1] == (64, 0)
    await collect(engine.generate(SimRequest("hit", p, 1, lora_name="sql-lora", cache_salt="tenant-a")))
    assert rec.prefix_queries[-1] == (64, 48)  # the hit stops short of the last prompt token
    # the router's index recovers the scope from lora_name and extra_keys[0]
    index = KVIndex()
    index.ensure_engine("e", model="m", block_size=16)
    index.apply("e", sink.stored()[:1])
    for lora, salt, blocks in [("sql-lora", "tenant-a", 4), ("sql-lora", None, 0), (None, "tenant-a", 0)]:
        assert index.match("e", block_keys(p, 16, chain_root("m", lora, salt)), 0.0).gpu_blocks == blocks


async def test_reset_prefix_cache_emits_all_blocks_cleared(sim: tuple[SimEngine, Recorder, Sink]) -> None:
    engine, rec, sink = sim
    p = prompt(64)
    await collect(engine.generate(SimRequest("a", p, 1)))
    assert engine.reset_prefix_cache()
    assert type(sink.batches[-1][-1]).__name__ == "AllBlocksCleared"
    await collect(engine.generate(SimRequest("b", p, 1)))
    assert rec.prefix_queries[-1] == (64, 0)


async def test_reset_refused_while_a_request_runs(sim: tuple[SimEngine, Recorder, Sink]) -> None:
    engine, _, _ = sim
    stream = engine.generate(SimRequest("a", prompt(64), 3000, ignore_eos=True))
    await anext(stream)
    assert not engine.reset_prefix_cache()
    await stream.aclose()  # type: ignore[attr-defined]


async def test_multi_round_chat_rehits_the_answer(sim: tuple[SimEngine, Recorder, Sink]) -> None:
    engine, rec, _ = sim
    history = [("system", "You are terse. " * 20), ("user", "Tell me about caches.")]
    first = apply_chat_template(history)
    outs = await collect(engine.generate(SimRequest("r1", first, 40, ignore_eos=True)))
    answer = [t for o in outs for t in o.new_token_ids]
    second = apply_chat_template([*history, ("assistant", decode(answer)), ("user", "More?")])
    await collect(engine.generate(SimRequest("r2", second, 5)))
    computed_before = len(first) + len(answer) - 1  # the last sampled token was never computed
    assert rec.prefix_queries[-1][1] == computed_before // 16 * 16


async def test_eos_sampling_stops_early_with_stop() -> None:
    engine, _, _ = await engine_with(mean_output_tokens=5.0)
    try:
        reasons = []
        for i in range(20):
            outs = await collect(engine.generate(SimRequest(f"r{i}", prompt(20, salt=i), 200)))
            tokens = [t for o in outs for t in o.new_token_ids]
            reasons.append(outs[-1].finish_reason)
            if outs[-1].finish_reason == "stop":
                assert tokens[-1] == STOP_TOKEN_ID and len(tokens) < 200
        assert reasons.count("stop") == 20
        # ignore_eos overrides it
        outs = await collect(engine.generate(SimRequest("x", prompt(20), 50, ignore_eos=True)))
        assert outs[-1].finish_reason == "length"
    finally:
        await engine.stop()


async def test_preemption_under_kv_pressure_is_counted_and_everything_finishes() -> None:
    engine, rec, _ = await engine_with(num_gpu_blocks=40, max_model_len=320, max_num_seqs=8)
    try:
        streams = [
            engine.generate(SimRequest(f"r{i}", prompt(100, salt=i), 150, ignore_eos=True)) for i in range(4)
        ]
        results = await asyncio.gather(*(collect(s) for s in streams))
        assert all(sum(len(o.new_token_ids) for o in r) == 150 for r in results)
        assert rec.preemptions > 0
        assert engine.kv_cache_usage == 0.0
    finally:
        await engine.stop()


async def test_idle_engine_does_not_step() -> None:
    engine, _, _ = await engine_with()
    try:
        await asyncio.sleep(0.05)
        assert engine.num_steps == 0
        await collect(engine.generate(SimRequest("a", prompt(10), 3)))
        steps = engine.num_steps
        await asyncio.sleep(0.05)
        assert engine.num_steps == steps
    finally:
        await engine.stop()


async def test_fast_engine_serves_many_streams_and_yields_to_the_loop() -> None:
    engine, rec, _ = await engine_with(speed=100_000.0)
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    tick_task = asyncio.create_task(ticker())
    try:
        results = await asyncio.gather(
            *(
                collect(engine.generate(SimRequest(f"r{i}", prompt(40, salt=i), 32, ignore_eos=True)))
                for i in range(400)
            )
        )
        assert all(sum(len(o.new_token_ids) for o in r) == 32 for r in results)
        assert len(rec.finished) == 400
        assert ticks > 10  # other tasks kept running while the engine worked
    finally:
        done = True
        await tick_task
        await engine.stop()


async def test_stop_ends_open_streams() -> None:
    engine, _, _ = await engine_with()
    stream = engine.generate(SimRequest("a", prompt(10), 3000, ignore_eos=True))
    await anext(stream)
    await engine.stop()
    outs = await collect(stream)
    assert outs[-1].finish_reason == "abort"
