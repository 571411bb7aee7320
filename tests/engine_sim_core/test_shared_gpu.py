"""Deployment terms of the cost model: token scale, GPU share, LMCache's synchronous offload.

Pure functions table-driven; the scheduler's offload accounting step by step; one engine on a real
event loop; the offload fit against the committed H200 engine logs.
"""

from __future__ import annotations

import gzip
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvstack.common.config import ConfigError, build
from kvstack.engine.sim.config import SimConfig
from kvstack.engine.sim.core import SimEngine
from kvstack.engine.sim.fit import offload_fit, offloads, theil_sen
from kvstack.engine.sim.kv_cache import KVCache
from kvstack.engine.sim.latency import (
    StepWork,
    engine_frontend_delay,
    engine_step_time,
    frontend_delay,
    offload_time,
    scale_work,
    step_time,
)
from kvstack.engine.sim.scheduler import Scheduler, SimSeq
from kvstack.engine.sim.types import SimRequest

from .conftest import Recorder, work

DEFAULT = build(SimConfig, "test config")


def cfg(**values: Any) -> SimConfig:
    return build(SimConfig, "test config", **values)


WORKS = [
    work([(512, 0)]),
    work([(2048, 4096)], decodes=[300] * 8),
    work(decodes=[64] * 32),
    work([(16, 0)], remote_load_tokens=1024, store_tokens=256),
    work([(700, 0)], offloads=1, offload_tokens=700),
]


# -- pure functions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("w", "s", "expected"),
    [
        (work([(100, 0)]), 1.0, work([(100, 0)])),
        # new tokens x s, attention (new x context) x s^2
        (work([(100, 50)]), 2.0, StepWork(prefill_tokens=200, prefill_attention=100 * 100 * 4.0)),
        # a decode stays one token; its context grows
        (work(decodes=[100, 300]), 2.5, StepWork(decodes=2, decode_context=1000)),
        (
            StepWork(
                cpu_load_tokens=10, remote_load_tokens=20, store_tokens=30, offloads=3, offload_tokens=40
            ),
            2.0,
            StepWork(
                cpu_load_tokens=20, remote_load_tokens=40, store_tokens=60, offloads=3, offload_tokens=80
            ),
        ),
    ],
)
def test_scale_work(w: StepWork, s: float, expected: StepWork) -> None:
    assert scale_work(w, s) == expected


@pytest.mark.parametrize(
    ("per_request", "per_token", "w", "seconds"),
    [
        (790.0, 4.49, StepWork(), 0.0),  # no prefill finished: nothing stored
        (790.0, 4.49, StepWork(offloads=1, offload_tokens=0), 790e-6),  # a full hit still stores a line
        (790.0, 4.49, StepWork(offloads=2, offload_tokens=1000), 2 * 790e-6 + 4490e-6),
        (0.0, 0.0, StepWork(offloads=5, offload_tokens=10_000), 0.0),  # the default: free
    ],
)
def test_offload_time(per_request: float, per_token: float, w: StepWork, seconds: float) -> None:
    assert offload_time(per_request, per_token, w) == pytest.approx(seconds, abs=1e-12)


@pytest.mark.parametrize("w", WORKS)
def test_defaults_are_the_reference_model(w: StepWork) -> None:
    assert engine_step_time(DEFAULT, w) == step_time(DEFAULT.latency, w)
    assert engine_frontend_delay(DEFAULT, 4096) == frontend_delay(DEFAULT.latency, 4096)


@pytest.mark.parametrize("w", WORKS)
@pytest.mark.parametrize("share", [0.5, 0.26])
def test_a_gpu_share_stretches_every_step(w: StepWork, share: float) -> None:
    assert engine_step_time(cfg(gpu_share=share), w) == pytest.approx(step_time(DEFAULT.latency, w) / share)


def test_the_offload_is_added_after_the_share() -> None:
    # The logged offload times were measured on the shared GPU: they are not stretched again.
    w = work([(700, 0)], offloads=1, offload_tokens=700)
    shared = cfg(gpu_share=0.5, lmcache={"store_us_per_request": 790, "store_us_per_token": 4.49})
    assert engine_step_time(shared, w) == pytest.approx(
        2 * step_time(DEFAULT.latency, w) + 790e-6 + 700 * 4.49e-6
    )


def test_token_scale_charges_model_tokens() -> None:
    scaled = cfg(token_cost_scale=2.0)
    w = work([(1000, 0)], offloads=1, offload_tokens=1000)
    assert engine_step_time(scaled, w) == step_time(DEFAULT.latency, work([(2000, 0)]))
    assert engine_frontend_delay(scaled, 1000) == frontend_delay(DEFAULT.latency, 2000)
    # A pure decode batch at short context is memory-bound: the scale hardly moves it.
    decode = work(decodes=[32] * 8)
    assert engine_step_time(scaled, decode) == pytest.approx(step_time(DEFAULT.latency, decode), rel=0.02)


def test_an_empty_step_costs_nothing_whatever_the_deployment() -> None:
    c = cfg(gpu_share=0.3, token_cost_scale=2.0, lmcache={"store_us_per_request": 790})
    assert engine_step_time(c, StepWork()) == 0.0


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"gpu_share": 0}, "gpu_share"),
        ({"gpu_share": 1.5}, "gpu_share"),
        ({"token_cost_scale": 0}, "token_cost_scale"),
        ({"lmcache": {"store_us_per_token": -1}}, "lmcache.store_us_per_token"),
        ({"lmcache": {"store_us_per_request": -1}}, "lmcache.store_us_per_request"),
    ],
)
def test_bad_deployment_fields_are_named(values: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build(SimConfig, "test config", **values)


# -- the scheduler counts what LMCache would store --------------------------------------------

BS = 4


def seq(rid: str, tokens: list[int], out: int = 3) -> SimSeq:
    return SimSeq(rid, list(tokens), len(tokens), out, False, seed=17, root=5)


def prompt(n: int, salt: int) -> list[int]:
    return [300 + (salt * 977 + 31 * i) % 9000 for i in range(n)]


def sched(num_blocks: int = 64, budget: int = 64) -> Scheduler:
    return Scheduler(KVCache(num_blocks, BS), max_num_seqs=8, max_num_batched_tokens=budget)


def test_a_prefill_is_offloaded_in_the_step_that_finishes_it() -> None:
    s = sched(budget=10)
    s.add(seq("a", prompt(25, 1)))
    counts = []
    while s.has_work:
        plan = s.schedule(0.0)
        counts.append((plan.work.offloads, plan.work.offload_tokens))
        s.update(plan)
    # chunks of 10, 10, 5 tokens, then two decodes: only the last chunk's step stores, all 25 tokens
    assert counts == [(0, 0), (0, 0), (1, 25), (0, 0), (0, 0)]


def test_only_computed_tokens_are_offloaded() -> None:
    s = sched()
    shared = prompt(16, 2)
    s.add(seq("a", shared))
    while s.has_work:
        s.update(s.schedule(0.0))
    s.add(seq("b", [*shared, *prompt(6, 3)]))
    plan = s.schedule(0.0)
    assert plan.admitted[0].local_hit == 16
    assert (plan.work.offloads, plan.work.offload_tokens) == (1, 6)


def test_several_prefills_in_one_step_are_summed() -> None:
    s = sched()
    for i, n in enumerate((7, 9, 12)):
        s.add(seq(f"r{i}", prompt(n, 10 + i)))
    plan = s.schedule(0.0)
    assert (plan.work.offloads, plan.work.offload_tokens) == (3, 28)


def test_a_recompute_after_preemption_stores_nothing_again() -> None:
    s = sched(num_blocks=6)
    a, b = seq("a", prompt(8, 4), out=8), seq("b", prompt(8, 5), out=8)
    s.add(a)
    s.add(b)
    offloads = 0
    while s.has_work:
        plan = s.schedule(0.0)
        offloads += plan.work.offloads
        s.update(plan)
    assert b.num_preemptions > 0
    assert offloads == 2  # each prompt once, however often b was recomputed


# -- an engine on a real event loop -------------------------------------------------------------


async def decode_itls(config: SimConfig, batch: int = 4) -> list[float]:
    rec = Recorder()
    engine = SimEngine(config, rec)
    await engine.start()
    try:
        for i in range(batch):
            async for _ in engine.generate(SimRequest(f"d{i}", prompt(32, 100 + i), 24, ignore_eos=True)):
                pass
    finally:
        await engine.stop()
    return [x for st in rec.finished for x in st.inter_token_latencies]


async def test_a_half_gpu_decodes_at_half_the_rate() -> None:
    whole = statistics.median(await decode_itls(cfg(speed=1.0)))
    half = statistics.median(await decode_itls(cfg(speed=1.0, gpu_share=0.5)))
    assert half == pytest.approx(2 * whole, rel=0.15)


async def test_the_offload_delays_the_first_token() -> None:
    async def ttft(config: SimConfig) -> float:
        rec = Recorder()
        engine = SimEngine(config, rec)
        await engine.start()
        try:
            async for _ in engine.generate(SimRequest("p", prompt(2048, 7), 1, ignore_eos=True)):
                pass
        finally:
            await engine.stop()
        assert rec.finished[0].ttft is not None
        return rec.finished[0].ttft

    plain = await ttft(cfg(speed=1.0))
    stored = await ttft(cfg(speed=1.0, lmcache={"store_us_per_request": 20_000, "store_us_per_token": 10}))
    assert stored - plain == pytest.approx(0.020 + 2048 * 10e-6, rel=0.3)


# -- the fit and the committed calibration --------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "LMCache INFO: [req_id=x] Stored 512 out of total 512 tokens. size: 0.0625 GB, cost 3.5752 ms, "
            "throughput: 17.4817 GB/s; offload_time: 3.4676 ms, put_time: 0.0793 ms",
            [(512, 3467.6)],
        ),
        ("Engine 000: Avg prompt throughput: 580.4 tokens/s", []),
        ("Stored 256 out of total 256 tokens. size: 0.0312 GB, cost 1.8 ms", []),  # no offload_time
    ],
)
def test_offload_lines(line: str, expected: list[tuple[int, float]]) -> None:
    got = offloads([line])
    assert [(n, round(us, 3)) for n, us in got] == expected


@pytest.mark.parametrize(
    ("points", "line"),
    [
        ([(0, 1.0), (1, 3.0), (2, 5.0)], (1.0, 2.0)),
        # a stalled store (x=2 took 100) moves least squares far; the median slope ignores it
        ([(0, 1.0), (1, 3.0), (2, 100.0), (3, 7.0), (4, 9.0)], (1.0, 2.0)),
    ],
)
def test_theil_sen(points: list[tuple[float, float]], line: tuple[float, float]) -> None:
    assert theil_sen(points) == pytest.approx(line)


def test_theil_sen_needs_two_x_values() -> None:
    with pytest.raises(ValueError, match="two different"):
        theil_sen([(5, 1.0), (5, 2.0)])


def test_the_committed_calibration_is_the_fit_of_the_committed_logs(repo_root: Path) -> None:
    gpu = repo_root / "bench-results" / "gpu"
    logs = sorted(gpu.glob("h200-*-engine*.log.gz"))
    assert len(logs) == 4
    lines: list[str] = []
    for p in logs:
        with gzip.open(p, "rt", errors="replace") as f:
            lines.extend(f)
    fit = offload_fit(lines)
    assert fit.points > 1000
    shared = yaml.safe_load((gpu / "sim-h200-shared.yaml").read_text())
    config = build(SimConfig, "sim-h200-shared.yaml", **shared)  # the file is a valid simulator config
    assert config.lmcache.store_us_per_request == pytest.approx(fit.fixed_us, abs=10)
    assert config.lmcache.store_us_per_token == pytest.approx(fit.per_token_us, abs=0.01)
    # Capacity and the step budget keep the real engine's, in simulated tokens.
    assert config.num_gpu_blocks * config.token_cost_scale == pytest.approx(13_131, rel=0.001)
    assert config.max_num_batched_tokens * config.token_cost_scale == pytest.approx(8192, rel=0.001)
