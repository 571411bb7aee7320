"""Configuration of one engine pod: vLLM 0.24 + the LMCache 0.5.3 connector.

Sources, highest priority first: environment variables (``KVSTACK_ENGINE_<FIELD>``, nested with
``__``: ``KVSTACK_ENGINE_LMCACHE__REMOTE_URL``), then the YAML file given with ``--config``, then
the defaults below. Load it with :func:`load_config`, so a bad field fails at start naming it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    SettingsConfigDict,
)

from kvstack.common.config import ConfigError, build_layered, read_config_file, split_comma_list
from kvstack.common.lora import LoraLimits
from kvstack.common.otlp import traces_url
from kvstack.engine.serve.managed import SECRET_FLAGS, colliding_env, colliding_flags, secret_flags

ENV_PREFIX = "KVSTACK_ENGINE_"
# vLLM 0.24's CacheConfig.BlockSize.
BLOCK_SIZES: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256)
BlockSize = Literal[1, 8, 16, 32, 64, 128, 256]
# The remote_url schemes the reference lists for LMCache 0.5.3.
REMOTE_SCHEMES: tuple[str, ...] = ("redis", "rediss", "redis-sentinel", "valkey", "lm", "fs", "s3")
_ZMQ_ENDPOINT = re.compile(r"^(tcp|ipc)://\S+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_HASH_SEED = 4_294_967_295  # the largest PYTHONHASHSEED CPython accepts


def _empty_is_none(value: Any) -> Any:
    # An env var can only say "unset" as an empty string.
    return None if value == "" else value


class KVEventsSettings(BaseModel):
    """vLLM's ZMQ KV-event publisher (``--kv-events-config``); the router subscribes to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = "tcp://*:5558"
    topic: str = "kv-events"

    @field_validator("replay_endpoint", mode="before")
    @classmethod
    def _unset_replay(cls, value: Any) -> Any:
        return _empty_is_none(value)

    @field_validator("endpoint", "replay_endpoint")
    @classmethod
    def _zmq_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not _ZMQ_ENDPOINT.match(value):
            raise ValueError("must be a ZMQ endpoint such as tcp://*:5557 or ipc:///path")
        return value


class LMCacheSettings(BaseModel):
    """The LMCache connector; rendered into ``LMCACHE_*`` environment variables."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    chunk_size: int = Field(256, gt=0, description="tokens per LMCache chunk, the unit it hashes")
    local_cpu: bool = True
    # LMCache sizes its pinned transfer buffer from this even when local_cpu is off.
    max_local_cpu_size: float = Field(5.0, gt=0, description="GB")
    local_disk: str | None = None
    max_local_disk_size: float = Field(0.0, ge=0, description="GB")
    remote_url: str | None = None
    remote_serde: Literal["naive", "cachegen", "kivi"] = "naive"
    save_decode_cache: bool = False
    # LMCache unpins a chunk a lookup pinned for a request that never loaded it after this long (its
    # monitor checks every 30 s); while pinned, a chunk cannot be evicted, so a full CPU tier of
    # such chunks fails stores (alert KvstackLMCacheEvictionFailing). LMCache's own default.
    pin_timeout_sec: int = Field(300, gt=0, description="seconds")
    # LMCache registers its metrics in vLLM's engine-core process; a single vLLM API server serves
    # only its own process's registry, so they never reach /metrics (seen on an H100: no lmcache:*
    # series). With this on, vLLM starts with an empty PROMETHEUS_MULTIPROC_DIR of its own, so its
    # /metrics collects every process's series, as vLLM does itself for several API servers.
    serve_metrics: bool = True
    # vLLM's default ("fail") fails a request whose KV load from LMCache fails (a full CPU buffer,
    # a dead Redis); "recompute" prefills it instead: a shared cache must never fail requests.
    kv_load_failure_policy: Literal["recompute", "fail"] = "recompute"

    @field_validator("local_disk", "remote_url", mode="before")
    @classmethod
    def _unset(cls, value: Any) -> Any:
        return _empty_is_none(value)

    @model_validator(mode="after")
    def _remote_scheme(self) -> LMCacheSettings:
        # Checked on the whole section so an error never echoes a URL that may hold a password.
        if self.remote_url is None:
            return self
        parts = urlsplit(self.remote_url)
        if parts.scheme not in REMOTE_SCHEMES:
            schemes = ", ".join(s + "://" for s in REMOTE_SCHEMES)
            raise ValueError(f"remote_url: scheme must be one of {schemes} (got {parts.scheme or 'none'}://)")
        if not (parts.netloc or (parts.scheme == "fs" and parts.path)):
            raise ValueError("remote_url: names no host (or, for fs://, no path)")
        return self

    @model_validator(mode="after")
    def _disk_needs_size(self) -> LMCacheSettings:
        if self.local_disk is not None and self.max_local_disk_size <= 0:
            raise ValueError(
                "max_local_disk_size must be > 0 when local_disk is set (LMCache would store nothing)"
            )
        return self


def _secret_flag_re(flag: str) -> re.Pattern[str]:
    # --api-key, --api_key, --api-key=..., --api-key.x in a shell-quoted or JSON string
    words = re.escape(flag[2:]).replace("\\-", "[-_]")
    return re.compile(rf"(?<![\w-])--{words}(?![\w-])")


def _parse_args(value: Any) -> Any:
    # From the environment: a JSON list, or a shell-quoted string.
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            return json.loads(value)
        return shlex.split(value)
    return value


def _parse_env_map(value: Any) -> Any:
    # From the environment: a JSON object.
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else {}
    if not isinstance(value, Mapping):
        raise ValueError("must be a mapping of NAME: value (from the environment: a JSON object)")
    # YAML reads HF_HUB_OFFLINE: 1 as an int; environment values are strings.
    return {
        k: str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for k, v in value.items()
    }


class EngineConfig(BaseSettings):
    """One engine pod. Field names are stable: the Helm chart and operator render them."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    model: str = Field(min_length=1, description="HF model id or a local path")
    served_model_name: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="names clients use; default: the model"
    )
    host: str = "0.0.0.0"  # a pod serves on all its interfaces
    port: int = Field(8000, ge=1, le=65535)
    api_key: SecretStr | None = None
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int | None = Field(None, ge=1, description="default: the model's own")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    block_size: BlockSize = 16
    enable_prefix_caching: bool = True
    kv_events: KVEventsSettings = KVEventsSettings()
    lmcache: LMCacheSettings = LMCacheSettings()
    # LoRA: set, the engine serves adapters and loads them at runtime (the operator places them)
    lora: LoraLimits | None = None
    python_hash_seed: str = "0"
    vllm_bin: str = Field("vllm", min_length=1)
    extra_args: Annotated[list[str], NoDecode] = Field(default_factory=list)
    extra_env: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    # vLLM's OTLP spans (--otlp-traces-endpoint), under the router's traceparent; None: none
    otlp_traces_endpoint: str | None = None
    otlp_traces_protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    # vLLM's development endpoints (VLLM_SERVER_DEV_MODE=1), among them POST /reset_prefix_cache,
    # which `kvstack bench gpu` calls between cases. Unauthenticated and able to drop every cache:
    # benchmarks only, never a served pod.
    dev_mode: bool = False

    @field_validator("otlp_traces_endpoint", mode="before")
    @classmethod
    def _otlp_unset(cls, value: Any) -> Any:
        return _empty_is_none(value)

    @field_validator("otlp_traces_endpoint")
    @classmethod
    def _otlp_url(cls, endpoint: str | None) -> str | None:
        if endpoint is not None:
            traces_url(endpoint)  # raises ValueError naming what is wrong
        return endpoint

    @field_validator("api_key", "max_model_len", mode="before")
    @classmethod
    def _unset(cls, value: Any) -> Any:
        return _empty_is_none(value)

    @field_validator("api_key", mode="before")
    @classmethod
    def _key_str(cls, value: Any) -> Any:
        # YAML reads an all-digit key as an int; a type error would echo the key.
        return str(value) if isinstance(value, int | float) else value

    @field_validator("block_size", mode="before")
    @classmethod
    def _block_int(cls, value: Any) -> Any:
        # Environment values are strings, and a Literal of ints does not coerce them.
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    _names = field_validator("served_model_name", mode="before")(split_comma_list)

    @field_validator("python_hash_seed", mode="before")
    @classmethod
    def _seed_str(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("kv_events")
    @classmethod
    def _events_need_prefix_cache(cls, value: KVEventsSettings, info: ValidationInfo) -> KVEventsSettings:
        if value.enabled and info.data.get("enable_prefix_caching") is False:
            raise ValueError("kv_events.enabled needs enable_prefix_caching: vLLM only emits events for it")
        return value

    @field_validator("lmcache")
    @classmethod
    def _chunk_fits_blocks(cls, value: LMCacheSettings, info: ValidationInfo) -> LMCacheSettings:
        block = info.data.get("block_size")
        if value.enabled and block and value.chunk_size % block:
            raise ValueError(
                f"lmcache.chunk_size ({value.chunk_size}) must be a multiple of block_size ({block})"
            )
        return value

    @field_validator("python_hash_seed")
    @classmethod
    def _fixed_seed(cls, value: str, info: ValidationInfo) -> str:
        if value == "random":
            lmcache = info.data.get("lmcache")
            if isinstance(lmcache, LMCacheSettings) and lmcache.enabled and lmcache.remote_url:
                raise ValueError(
                    "must be a fixed number when lmcache.remote_url is set: pods hash chunks with "
                    "Python's hash(), so random seeds share nothing"
                )
            return value
        if not value.isdigit() or int(value) > _MAX_HASH_SEED:
            raise ValueError(f'must be "random" or an integer from 0 to {_MAX_HASH_SEED}')
        return value

    @field_validator("extra_args")
    @classmethod
    def _no_managed_flags(cls, value: list[str]) -> list[str]:
        if clash := colliding_flags(value):
            raise ValueError(f"sets flags kvstack manages: {' '.join(clash)}; use the config fields instead")
        return value

    @model_validator(mode="before")
    @classmethod
    def _extras(cls, data: Any) -> Any:
        # Parsed and checked at model level, before any field check, because a field error echoes
        # its raw input, and these two may hold secrets (an HF_TOKEN, an --api-key).
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        raw = data.get("extra_args")
        found: list[str] = []
        if isinstance(raw, str):
            found = [flag for flag in SECRET_FLAGS if _secret_flag_re(flag).search(raw)]
        elif isinstance(raw, list):
            found = secret_flags(str(arg) for arg in raw)
        if found:
            instead = ", ".join(f"{flag} -> {SECRET_FLAGS[flag]}" for flag in found)
            raise ValueError(f"extra_args puts a secret on the command line, visible in ps; use {instead}")
        for name, parse in (("extra_args", _parse_args), ("extra_env", _parse_env_map)):
            if name in data:
                try:
                    data[name] = parse(data[name])
                except ValueError as err:
                    raise ValueError(f"{name}: cannot parse: {err}") from None
        return data

    @field_validator("extra_env")
    @classmethod
    def _no_managed_env(cls, value: dict[str, str]) -> dict[str, str]:
        if bad := [name for name in value if not _ENV_NAME.match(name)]:
            raise ValueError(f"invalid environment variable names: {', '.join(sorted(bad))}")
        if clash := colliding_env(value):
            raise ValueError(
                f"sets variables kvstack manages: {', '.join(clash)}; use the config fields instead"
            )
        return value


def unknown_env_vars(environ: Mapping[str, str]) -> list[str]:
    """``KVSTACK_ENGINE_*`` variables that name no field (typos would otherwise be ignored).

    The ``__`` nested form works for the sections only; ``extra_env`` takes a JSON object, since
    environment variable names are case-sensitive and settings names are not.
    """
    fields = {name.upper() for name in EngineConfig.model_fields}
    sections = {"KV_EVENTS", "LMCACHE", "LORA"}
    unknown = []
    for key in environ:
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX):
            continue
        head, nested, _ = upper[len(ENV_PREFIX) :].partition("__")
        if head not in fields or (nested and head not in sections):
            unknown.append(key)
    return sorted(unknown)


def load_config(path: Path | None = None) -> EngineConfig:
    """Defaults, overridden by the file at ``path``, overridden by ``KVSTACK_ENGINE_*``."""
    if unknown := unknown_env_vars(os.environ):
        raise ConfigError(f"invalid engine config: unknown environment variables {', '.join(unknown)}")
    values = read_config_file(path) if path is not None else {}
    source = f"engine config ({path} + {ENV_PREFIX}* environment)" if path else "engine config"
    # The environment overrides the file, so one ConfigMap can serve many pods that differ only in
    # a few env vars.
    return build_layered(EngineConfig, source, file_values=values, flags={})
