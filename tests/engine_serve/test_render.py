"""render(): the exact vLLM 0.24 argv and environment for each option."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvstack.common.config import build
from kvstack.engine.serve.config import EngineConfig
from kvstack.engine.serve.render import LaunchSpec, child_env, needs_metrics_dir, overridden_env, render

KV_TRANSFER = '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both","kv_load_failure_policy":"recompute"}'


def spec(**values: Any) -> LaunchSpec:
    return render(build(EngineConfig, "engine config", **{"model": "org/model", **values}))


def flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_default_command_is_the_reference_launch() -> None:
    assert spec().argv == [
        "vllm",
        "serve",
        "org/model",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--tensor-parallel-size",
        "1",
        "--gpu-memory-utilization",
        "0.9",
        "--block-size",
        "16",
        "--enable-prefix-caching",
        "--kv-transfer-config",
        KV_TRANSFER,
    ]


def test_default_environment() -> None:
    assert spec().env == {
        "LMCACHE_CHUNK_SIZE": "256",
        "LMCACHE_LOCAL_CPU": "true",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "5.0",
        "LMCACHE_PIN_TIMEOUT_SEC": "300",
        "LMCACHE_REMOTE_SERDE": "naive",
        "LMCACHE_SAVE_DECODE_CACHE": "false",
        "LMCACHE_TRACK_USAGE": "false",
        "PYTHONHASHSEED": "0",
        "VLLM_NO_USAGE_STATS": "1",
    }


@pytest.mark.parametrize(
    ("values", "flag", "expected"),
    [
        ({"host": "127.0.0.1"}, "--host", "127.0.0.1"),
        ({"port": 8100}, "--port", "8100"),
        ({"tensor_parallel_size": 4}, "--tensor-parallel-size", "4"),
        ({"max_model_len": 32768}, "--max-model-len", "32768"),
        ({}, "--max-model-len", None),
        ({"gpu_memory_utilization": 0.85}, "--gpu-memory-utilization", "0.85"),
        ({"gpu_memory_utilization": 1}, "--gpu-memory-utilization", "1.0"),
        ({"block_size": 32}, "--block-size", "32"),
        ({"served_model_name": ["llama"]}, "--served-model-name", "llama"),
        ({}, "--served-model-name", None),
        ({"lmcache": {"enabled": False}}, "--kv-transfer-config", None),
        ({}, "--kv-events-config", None),
    ],
)
def test_each_option_renders_its_flag(values: dict[str, Any], flag: str, expected: str | None) -> None:
    assert flag_value(spec(**values).argv, flag) == expected


def test_several_served_model_names_follow_one_flag() -> None:
    argv = spec(served_model_name="llama, llama-8b").argv
    at = argv.index("--served-model-name")
    assert argv[at + 1 : at + 3] == ["llama", "llama-8b"]
    assert argv[at + 3].startswith("--")


@pytest.mark.parametrize(
    ("enabled", "present", "absent"),
    [
        (True, "--enable-prefix-caching", "--no-enable-prefix-caching"),
        (False, "--no-enable-prefix-caching", "--enable-prefix-caching"),
    ],
)
def test_prefix_caching_is_always_explicit(enabled: bool, present: str, absent: str) -> None:
    argv = spec(enable_prefix_caching=enabled).argv
    assert present in argv and absent not in argv


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        (
            {"enabled": True},
            {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": "tcp://*:5557",
                "replay_endpoint": "tcp://*:5558",
                "topic": "kv-events",
            },
        ),
        (
            {"enabled": True, "endpoint": "tcp://*:6000", "replay_endpoint": None, "topic": "kv@pod-1"},
            {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": "tcp://*:6000",
                "topic": "kv@pod-1",
            },
        ),
    ],
)
def test_kv_events_config(events: dict[str, Any], expected: dict[str, Any]) -> None:
    raw = flag_value(spec(kv_events=events).argv, "--kv-events-config")
    assert raw is not None
    assert json.loads(raw) == expected
    assert list(json.loads(raw)) == list(expected)  # stable key order: the argv is byte-for-byte stable


@pytest.mark.parametrize(
    ("lmcache", "expected"),
    [
        ({"chunk_size": 512}, {"LMCACHE_CHUNK_SIZE": "512"}),
        ({"local_cpu": False}, {"LMCACHE_LOCAL_CPU": "false"}),
        ({"max_local_cpu_size": 20}, {"LMCACHE_MAX_LOCAL_CPU_SIZE": "20.0"}),
        ({"max_local_cpu_size": 2.5}, {"LMCACHE_MAX_LOCAL_CPU_SIZE": "2.5"}),
        (
            {"local_disk": "file:///cache", "max_local_disk_size": 100},
            {"LMCACHE_LOCAL_DISK": "file:///cache", "LMCACHE_MAX_LOCAL_DISK_SIZE": "100.0"},
        ),
        ({}, {"LMCACHE_LOCAL_DISK": None, "LMCACHE_MAX_LOCAL_DISK_SIZE": None, "LMCACHE_REMOTE_URL": None}),
        ({"remote_url": "redis://redis:6379"}, {"LMCACHE_REMOTE_URL": "redis://redis:6379"}),
        ({"remote_url": "lm://cache-server:65432"}, {"LMCACHE_REMOTE_URL": "lm://cache-server:65432"}),
        ({"remote_url": "fs:///mnt/kv"}, {"LMCACHE_REMOTE_URL": "fs:///mnt/kv"}),
        (
            {"remote_url": "s3://bucket.s3.us-east-1.amazonaws.com"},
            {"LMCACHE_REMOTE_URL": "s3://bucket.s3.us-east-1.amazonaws.com"},
        ),
        ({"remote_serde": "cachegen"}, {"LMCACHE_REMOTE_SERDE": "cachegen"}),
        ({"save_decode_cache": True}, {"LMCACHE_SAVE_DECODE_CACHE": "true"}),
        ({"pin_timeout_sec": 60}, {"LMCACHE_PIN_TIMEOUT_SEC": "60"}),
    ],
)
def test_lmcache_environment(lmcache: dict[str, Any], expected: dict[str, str | None]) -> None:
    env = spec(lmcache=lmcache).env
    assert {name: env.get(name) for name in expected} == expected


def test_lmcache_off_sets_no_lmcache_settings_but_keeps_telemetry_off() -> None:
    env = spec(lmcache={"enabled": False, "remote_url": "redis://r:6379"}).env
    assert [k for k in env if k.startswith("LMCACHE_")] == ["LMCACHE_TRACK_USAGE"]
    assert env["LMCACHE_TRACK_USAGE"] == "false"


@pytest.mark.parametrize("seed", ["0", "1234", "random"])
def test_python_hash_seed(seed: str) -> None:
    assert spec(python_hash_seed=seed).env["PYTHONHASHSEED"] == seed


def test_api_key_goes_to_the_environment_never_argv() -> None:
    out = spec(api_key="sk-secret")
    assert out.env["VLLM_API_KEY"] == "sk-secret"
    assert out.secret_env == frozenset({"VLLM_API_KEY"})
    assert not any("sk-secret" in arg for arg in out.argv)
    assert "--api-key" not in out.argv


def test_no_api_key_no_variable() -> None:
    out = spec()
    assert "VLLM_API_KEY" not in out.env and out.secret_env == frozenset()


def test_extra_args_come_last_in_order() -> None:
    argv = spec(extra_args=["--max-num-seqs", "128", "--enable-chunked-prefill"]).argv
    assert argv[-3:] == ["--max-num-seqs", "128", "--enable-chunked-prefill"]


def test_extra_env_is_added() -> None:
    env = spec(extra_env={"HF_HOME": "/models", "VLLM_USE_FLASHINFER_SAMPLER": "0"}).env
    assert env["HF_HOME"] == "/models" and env["VLLM_USE_FLASHINFER_SAMPLER"] == "0"


def test_vllm_bin() -> None:
    assert spec(vllm_bin="/opt/venv/bin/vllm").argv[:3] == ["/opt/venv/bin/vllm", "serve", "org/model"]


def test_output_is_deterministic() -> None:
    values: dict[str, Any] = {
        "extra_env": {"B": "2", "A": "1"},
        "kv_events": {"enabled": True},
        "lmcache": {"remote_url": "redis://r:6379"},
    }
    first, second = spec(**values), spec(**values)
    assert first == second
    assert list(first.env) == sorted(first.env)


def test_child_env_drops_our_settings_and_overrides_the_pod() -> None:
    out = spec(api_key="k")
    base = {
        "PATH": "/usr/bin",
        "PYTHONHASHSEED": "99",
        "KVSTACK_ENGINE_API_KEY": "k",
        "VLLM_API_KEY": "k",
        "kvstack_engine_port": "1",
    }
    env = child_env(base, out)
    assert overridden_env(base, out) == ["PYTHONHASHSEED"]  # the API key is the same: no word of it
    assert env["PATH"] == "/usr/bin"
    assert env["PYTHONHASHSEED"] == "0"
    assert env["VLLM_API_KEY"] == "k"
    assert not any(k.upper().startswith("KVSTACK_ENGINE_") for k in env)


@pytest.mark.parametrize(
    ("lmcache", "pod", "needed"),
    [
        ({}, {}, True),  # LMCache on (the default): its engine-core series need the shared folder
        ({"serve_metrics": False}, {}, False),
        ({"enabled": False}, {}, False),  # vLLM's own series are all in its API server process
        ({}, {"PROMETHEUS_MULTIPROC_DIR": "/metrics"}, False),  # the pod's own folder is kept
    ],
)
def test_a_metrics_folder_is_made_only_for_lmcache_series_the_pod_does_not_collect(
    lmcache: dict[str, Any], pod: dict[str, str], needed: bool
) -> None:
    assert needs_metrics_dir(pod, spec(lmcache=lmcache)) is needed


def test_a_metrics_folder_named_in_extra_env_is_kept() -> None:
    named = spec(extra_env={"PROMETHEUS_MULTIPROC_DIR": "/var/metrics"})
    assert not needs_metrics_dir({}, named)
    assert child_env({}, named)["PROMETHEUS_MULTIPROC_DIR"] == "/var/metrics"


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_kv_load_failure_policy_goes_into_the_transfer_config(policy: str) -> None:
    argv = spec(lmcache={"kv_load_failure_policy": policy}).argv
    transfer = json.loads(flag_value(argv, "--kv-transfer-config") or "{}")
    assert transfer == {
        "kv_connector": "LMCacheConnectorV1",
        "kv_role": "kv_both",
        "kv_load_failure_policy": policy,
    }


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, None),  # off by default: a served pod never exposes the reset routes
        ({"dev_mode": False}, None),
        ({"dev_mode": True}, "1"),
        ({"dev_mode": True, "lmcache": {"enabled": False}}, "1"),
    ],
)
def test_dev_mode_sets_vllm_server_dev_mode(values: dict[str, Any], expected: str | None) -> None:
    out = spec(**values)
    assert out.env.get("VLLM_SERVER_DEV_MODE") == expected
    assert not any("DEV_MODE" in arg for arg in out.argv)
