"""The vLLM flags and environment variables that ``kvstack engine serve`` sets itself.

User-supplied extras must not set them a second time: vLLM's argparse keeps the last value of a
repeated flag, so a stray ``--port`` in ``extra_args`` would silently override the pod's port.
"""

from __future__ import annotations

from collections.abc import Iterable

# Long flags we render, as vLLM 0.24 spells them (its parser also accepts ``_`` for ``-``).
MANAGED_FLAGS: frozenset[str] = frozenset(
    {
        "--model",
        "--served-model-name",
        "--host",
        "--port",
        "--tensor-parallel-size",
        "--max-model-len",
        "--gpu-memory-utilization",
        "--block-size",
        "--enable-prefix-caching",
        "--no-enable-prefix-caching",
        "--kv-transfer-config",
        "--kv-events-config",
        "--otlp-traces-endpoint",
        "--enable-lora",
        "--no-enable-lora",
        "--max-loras",
        "--max-lora-rank",
        "--max-cpu-loras",
    }
)
# Flags whose value is a secret: argv is world-readable (``ps``, /proc), the environment is not.
SECRET_FLAGS: dict[str, str] = {"--api-key": "api_key", "--hf-token": "extra_env HF_TOKEN"}
# vLLM's short aliases of managed flags.
MANAGED_SHORT_FLAGS: dict[str, str] = {"-tp": "--tensor-parallel-size"}

MANAGED_ENV: frozenset[str] = frozenset(
    {
        "PYTHONHASHSEED",
        "VLLM_API_KEY",
        "VLLM_NO_USAGE_STATS",
        "LMCACHE_TRACK_USAGE",
        "LMCACHE_CHUNK_SIZE",
        "LMCACHE_LOCAL_CPU",
        "LMCACHE_MAX_LOCAL_CPU_SIZE",
        "LMCACHE_LOCAL_DISK",
        "LMCACHE_MAX_LOCAL_DISK_SIZE",
        "LMCACHE_REMOTE_URL",
        "LMCACHE_REMOTE_SERDE",
        "LMCACHE_SAVE_DECODE_CACHE",
        "LMCACHE_PIN_TIMEOUT_SEC",
        # would override every LMCACHE_* variable above with a file we did not render
        "LMCACHE_CONFIG_FILE",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",  # otlp_traces_protocol
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
        "VLLM_SERVER_DEV_MODE",  # dev_mode
    }
)


def flag_name(arg: str) -> str | None:
    """The canonical long flag an argv item sets, or None for a value.

    ``--max_model_len=4096`` and ``--kv-transfer-config.kv_role=x`` (vLLM's dotted form for JSON
    options) name ``--max-model-len`` and ``--kv-transfer-config``.
    """
    if not arg.startswith("-") or arg == "-" or _is_number(arg):
        return None
    name = arg.split("=", 1)[0]
    if name.startswith("--"):
        return "--" + name[2:].split(".", 1)[0].replace("_", "-")
    return MANAGED_SHORT_FLAGS.get(name, name)


def colliding_flags(args: Iterable[str]) -> list[str]:
    """The items of ``args`` that set a flag we manage, in order, without repeats."""
    found: list[str] = []
    for arg in args:
        name = flag_name(arg)
        if name in MANAGED_FLAGS and arg not in found:
            found.append(arg)
    return found


def secret_flags(args: Iterable[str]) -> list[str]:
    """The secret-carrying flags that ``args`` set, as canonical names, in order, without repeats."""
    found: list[str] = []
    for arg in args:
        name = flag_name(arg)
        if name in SECRET_FLAGS and name not in found:
            found.append(name)
    return found


def colliding_env(names: Iterable[str]) -> list[str]:
    """The environment variable names we manage among ``names``, sorted."""
    return sorted(n for n in names if n in MANAGED_ENV)


def _is_number(arg: str) -> bool:
    try:
        float(arg)
    except ValueError:
        return False
    return True
