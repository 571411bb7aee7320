"""Render an :class:`EngineConfig` into the exact ``vllm serve`` command and environment (pure)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvstack.common.lora import RUNTIME_UPDATING_ENV
from kvstack.engine.serve.config import ENV_PREFIX, EngineConfig, KVEventsSettings, LMCacheSettings

# The connector ships with vLLM and loads the installed lmcache package's implementation.
KV_TRANSFER_CONFIG: dict[str, str] = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
# vLLM 0.24 mounts its development routes (/reset_prefix_cache, /sleep, ...) only with this set.
DEV_MODE_ENV = "VLLM_SERVER_DEV_MODE"


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """What to exec: ``argv`` with ``env`` added to the pod's environment."""

    argv: list[str]
    env: dict[str, str]
    # names in ``env`` whose values are secrets: never printed, never put in argv
    secret_env: frozenset[str] = field(default_factory=frozenset)
    # exec gives vLLM a new empty PROMETHEUS_MULTIPROC_DIR (lmcache.serve_metrics), unless the pod
    # sets one: a directory is made at start, so it is no part of this pure description
    metrics_dir: bool = False


def render(config: EngineConfig) -> LaunchSpec:
    """The ``vllm serve`` argv and environment for ``config``; same input, same output."""
    argv = [config.vllm_bin, "serve", config.model, "--host", config.host, "--port", str(config.port)]
    if config.served_model_name:
        argv += ["--served-model-name", *config.served_model_name]
    argv += ["--tensor-parallel-size", str(config.tensor_parallel_size)]
    if config.max_model_len is not None:
        argv += ["--max-model-len", str(config.max_model_len)]
    argv += ["--gpu-memory-utilization", _number(config.gpu_memory_utilization)]
    argv += ["--block-size", str(config.block_size)]
    argv.append("--enable-prefix-caching" if config.enable_prefix_caching else "--no-enable-prefix-caching")
    if config.lmcache.enabled:
        transfer = {**KV_TRANSFER_CONFIG, "kv_load_failure_policy": config.lmcache.kv_load_failure_policy}
        argv += ["--kv-transfer-config", _json(transfer)]
    if config.kv_events.enabled:
        argv += ["--kv-events-config", _json(kv_events_config(config.kv_events))]
    if config.otlp_traces_endpoint is not None:
        argv += ["--otlp-traces-endpoint", config.otlp_traces_endpoint]
    if config.lora is not None:
        argv += config.lora.engine_args()
    argv += config.extra_args

    env: dict[str, str] = {
        # vLLM's hash-chain root and LMCache's chunk keys come from Python's hash(): pods share
        # KV only when every pod runs with the same seed (measured: a random seed shares nothing).
        "PYTHONHASHSEED": config.python_hash_seed,
        # no usage telemetry leaves the cluster
        "VLLM_NO_USAGE_STATS": "1",
        "LMCACHE_TRACK_USAGE": "false",
    }
    if config.lmcache.enabled:
        env.update(lmcache_env(config.lmcache))
    if config.otlp_traces_endpoint is not None:
        # vLLM's exporter reads it (its default, grpc, needs the gRPC exporter in the image)
        env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = config.otlp_traces_protocol
    if config.lora is not None:
        # the operator loads and unloads the declared adapters through the runtime endpoints
        env[RUNTIME_UPDATING_ENV] = "True"
    if config.dev_mode:
        env[DEV_MODE_ENV] = "1"
    secret: set[str] = set()
    if config.api_key is not None:
        env["VLLM_API_KEY"] = config.api_key.get_secret_value()
        secret.add("VLLM_API_KEY")
    env.update(config.extra_env)
    metrics_dir = config.lmcache.enabled and config.lmcache.serve_metrics
    return LaunchSpec(
        argv=argv, env=dict(sorted(env.items())), secret_env=frozenset(secret), metrics_dir=metrics_dir
    )


def kv_events_config(events: KVEventsSettings) -> dict[str, Any]:
    """vLLM's ``KVEventsConfig`` for the ZMQ publisher (and its replay socket, when set)."""
    cfg: dict[str, Any] = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": events.endpoint,
    }
    if events.replay_endpoint is not None:
        cfg["replay_endpoint"] = events.replay_endpoint
    cfg["topic"] = events.topic
    return cfg


def lmcache_env(lmcache: LMCacheSettings) -> dict[str, str]:
    """``LMCACHE_*`` variables, named and formatted the way LMCache 0.5.3's env loader reads them."""
    env = {
        "LMCACHE_CHUNK_SIZE": str(lmcache.chunk_size),
        "LMCACHE_LOCAL_CPU": _bool(lmcache.local_cpu),
        "LMCACHE_MAX_LOCAL_CPU_SIZE": _number(lmcache.max_local_cpu_size),
        "LMCACHE_REMOTE_SERDE": lmcache.remote_serde,
        "LMCACHE_SAVE_DECODE_CACHE": _bool(lmcache.save_decode_cache),
        "LMCACHE_PIN_TIMEOUT_SEC": str(lmcache.pin_timeout_sec),
    }
    if lmcache.local_disk is not None:
        env["LMCACHE_LOCAL_DISK"] = lmcache.local_disk
        env["LMCACHE_MAX_LOCAL_DISK_SIZE"] = _number(lmcache.max_local_disk_size)
    if lmcache.remote_url is not None:
        env["LMCACHE_REMOTE_URL"] = lmcache.remote_url
    return env


def child_env(base: Mapping[str, str], spec: LaunchSpec) -> dict[str, str]:
    """The environment vLLM runs with: the pod's, minus our own settings, plus ``spec.env``."""
    # KVSTACK_ENGINE_* are consumed here; dropping them keeps e.g. the API key's source out of vLLM.
    kept = {k: v for k, v in base.items() if not k.upper().startswith(ENV_PREFIX)}
    return {**kept, **spec.env}


def needs_metrics_dir(base: Mapping[str, str], spec: LaunchSpec) -> bool:
    """Whether exec must make vLLM's PROMETHEUS_MULTIPROC_DIR: asked for, and neither the pod nor
    the config's ``extra_env`` names one."""
    name = "PROMETHEUS_MULTIPROC_DIR"
    return spec.metrics_dir and name not in base and name not in spec.env


def overridden_env(base: Mapping[str, str], spec: LaunchSpec) -> list[str]:
    """Names the pod sets to a value ``spec.env`` replaces, sorted: a user's setting that would
    otherwise vanish without a word (LMCache reads our ``LMCACHE_*``, not the pod's)."""
    return sorted(k for k, v in spec.env.items() if k in base and base[k] != v)


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _number(value: float) -> str:
    # 0.9 -> "0.9", 5.0 -> "5.0": Python's shortest round-trip form, which float() reads back.
    return repr(float(value))
