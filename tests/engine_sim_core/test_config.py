"""SimConfig: defaults, validation that names the field, and the PYTHONHASHSEED rule."""

from __future__ import annotations

import pytest

from kvstack.common.config import ConfigError, build
from kvstack.engine.sim.config import DEFAULT_NUM_GPU_BLOCKS, SimConfig, python_hash_seed
from kvstack.engine.sim.core import SimEngine


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"PYTHONHASHSEED": "random"}, None),
        ({"PYTHONHASHSEED": "0"}, 0),
        ({"PYTHONHASHSEED": "4294967295"}, 4294967295),
        ({"PYTHONHASHSEED": "4294967296"}, None),  # CPython refuses it too
        ({"PYTHONHASHSEED": "abc"}, None),
    ],
)
def test_python_hash_seed(env: dict[str, str], expected: int | None) -> None:
    assert python_hash_seed(env) == expected


def test_seeds_follow_pythonhashseed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONHASHSEED", "42")
    cfg = build(SimConfig, "test config")
    assert (cfg.hash_seed, cfg.block_hash_seed) == (42, 42)


def test_seeds_are_random_per_process_without_pythonhashseed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    seeds = {build(SimConfig, "test config").hash_seed for _ in range(8)}
    assert len(seeds) > 1


def test_defaults() -> None:
    cfg = build(SimConfig, "test config")
    assert cfg.served_names == ["kvstack/sim-8b"]
    assert (cfg.max_model_len, cfg.block_size, cfg.max_num_seqs, cfg.max_num_batched_tokens) == (
        32768,
        16,
        256,
        8192,
    )
    assert cfg.num_gpu_blocks == DEFAULT_NUM_GPU_BLOCKS
    assert cfg.enable_prefix_caching and not cfg.lmcache.enabled and cfg.lmcache.chunk_size == 256


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"speed": 0}, "speed"),
        ({"block_size": 0}, "block_size"),
        ({"lmcache": {"remote_url": "http://x"}}, "lmcache.remote_url"),
        ({"lmcache": {"chunk_size": 100}}, "chunk_size must be a multiple of block_size"),
        ({"max_num_batched_tokens": 8, "max_num_seqs": 16}, "max_num_batched_tokens"),
        ({"long_prefill_token_threshold": -1}, "long_prefill_token_threshold"),
        ({"long_prefill_token_threshold": "lots"}, "long_prefill_token_threshold"),
        ({"latency": {"per_token_s": -1}}, "latency.per_token_s"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_fields_are_named(values: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build(SimConfig, "test config", **values)


@pytest.mark.parametrize(
    ("values", "threshold"),
    [
        ({}, 0),  # off by default, as vLLM
        ({"long_prefill_token_threshold": 512}, 512),
        # above max_num_batched_tokens: vLLM accepts it (it then has no effect), so does the simulator
        ({"long_prefill_token_threshold": 9000, "max_num_batched_tokens": 8192}, 9000),
    ],
)
def test_long_prefill_token_threshold_reaches_the_scheduler(
    values: dict[str, object], threshold: int
) -> None:
    cfg = build(SimConfig, "test config", **values)
    assert cfg.long_prefill_token_threshold == threshold
    assert SimEngine(cfg).scheduler.long_prefill_token_threshold == threshold
