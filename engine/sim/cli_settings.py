"""Settings of ``kvstack engine sim``: the pod's server section, and flags laid over a config file.

The command reads a config file (engine fields, and a ``server:`` section), then lays the flags
that were given over it: a flag wins, a flag left out keeps the file's value.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvstack.common.otlp import sdk_missing, traces_url


class ServeSettings(BaseModel):
    """The pod's HTTP and KV-event settings (the ``server:`` section of a config file)."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    kv_events_endpoint: str | None = Field(None, pattern=r"^(tcp|ipc|inproc)://")
    kv_events_replay_endpoint: str | None = Field(None, pattern=r"^(tcp|ipc|inproc)://")
    kv_events_topic: str = "kv-events"
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    log_level: str = Field("warning", pattern=r"^(critical|error|warning|info|debug|trace)$")
    # vLLM's flag: an llm_request span per generation request, under the request's traceparent
    otlp_traces_endpoint: str | None = None

    @field_validator("otlp_traces_endpoint")
    @classmethod
    def _otlp_url(cls, endpoint: str | None) -> str | None:
        if endpoint is not None:
            traces_url(endpoint)  # raises ValueError naming what is wrong
            if (missing := sdk_missing()) is not None:
                raise ValueError(missing)
        return endpoint


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``, nested mappings merged key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def split_settings(
    file_values: dict[str, Any], engine_flags: dict[str, Any], server_flags: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(SimConfig values, ServeSettings values): flags that were given win over the file."""
    file_values = dict(file_values)
    server_file = file_values.pop("server", None) or {}
    if not isinstance(server_file, dict):
        server_file = {"<server>": server_file}  # build() then names the bad section
    given = {k: v for k, v in engine_flags.items() if v is not None}
    for section in ("lmcache", "lora"):
        values = {k: v for k, v in given.pop(section, {}).items() if v is not None}
        if values:
            given[section] = values
    engine = merge(file_values, given)
    server = merge(server_file, {k: v for k, v in server_flags.items() if v is not None})
    return engine, server
