"""vLLM 0.24's LoRA surface for the simulator: limits, the adapter registry and the GPU/CPU slots (pure).

Three layers, as in vLLM:

* :class:`LoRAConfig` mirrors ``--enable-lora``, ``--max-loras``, ``--max-lora-rank``,
  ``--max-cpu-loras`` and ``--lora-modules``, and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` (which adds the
  ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` routes);
* :class:`AdapterRegistry` is the API server's view (``OpenAIServingModels.lora_requests``): what
  ``/v1/models`` lists, with vLLM's checks, messages and status codes on load and unload;
* :class:`AdapterSlots` is the worker's LRU caches: ``max_loras`` GPU slots and ``max_cpu_loras``
  CPU copies. A step whose adapters are not all in GPU slots copies the missing ones in (a swap,
  charged by :mod:`kvstack.engine.sim.latency`); one evicted from the CPU cache is read from disk first.

The scheduler never puts more than ``max_loras`` distinct adapters in one step (vLLM V1 skips a
waiting request whose adapter would exceed it), so swaps happen between steps as the mix changes.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvstack.common.errors import OpenAIError

MaxLoRARank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]  # vLLM 0.24's MaxLoRARanks


def runtime_updating_from_env(environ: dict[str, str] | None = None) -> bool:
    """``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` as vLLM 0.24 reads it ("1" or "true", any case)."""
    raw = (os.environ if environ is None else environ).get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0")
    return raw.strip().lower() in ("1", "true")


class LoRAModule(BaseModel):
    """One ``--lora-modules`` entry: an adapter loaded at startup."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    base_model_name: str | None = None

    @classmethod
    def parse(cls, text: str) -> LoRAModule:
        """``name=path`` or the JSON form ``{"name": ..., "path": ..., "base_model_name": ...}``."""
        text = text.strip()
        if text.startswith("{"):
            return cls.model_validate_json(text)
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules takes name=path or JSON, got {text!r}")
        return cls(name=name, path=path)


class LoRAConfig(BaseModel):
    """The engine's LoRA limits (vLLM's LoRAConfig) and the runtime-updating switch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="--enable-lora: serve adapters on the base model.")
    max_loras: int = Field(1, ge=1, description="--max-loras: distinct adapters in one step (GPU slots).")
    max_lora_rank: MaxLoRARank = Field(16, description="--max-lora-rank: the largest rank accepted.")
    max_cpu_loras: int | None = Field(
        None, ge=1, description="--max-cpu-loras: adapters kept in CPU memory (LRU); None: max_loras."
    )
    modules: list[LoRAModule] = Field(default_factory=list, description="--lora-modules, loaded at start.")
    runtime_updating: bool = Field(
        default_factory=runtime_updating_from_env,
        description="VLLM_ALLOW_RUNTIME_LORA_UPDATING: serve /v1/load_lora_adapter and "
        "/v1/unload_lora_adapter.",
    )
    check_paths: bool = Field(
        False,
        description="Simulator only: an adapter path must be a local folder (else vLLM's 'No adapter "
        "found'); off, any path is taken as a Hub id or a volume this process cannot see. A folder with "
        "adapter_config.json has its rank checked either way.",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}).")
        if self.modules and not self.enabled:
            raise ValueError("modules (--lora-modules) need enabled (--enable-lora)")
        names = [m.name for m in self.modules]
        if len(set(names)) != len(names):
            raise ValueError(f"modules: duplicate adapter names in {names}")
        return self

    @property
    def cpu_capacity(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras


class LoRAError(OpenAIError):
    """An OpenAIError whose ``type`` is vLLM's own (e.g. ``InvalidUserInput``), not the status's name."""

    def __init__(self, status: int, message: str, err_type: str) -> None:
        super().__init__(status, message)
        self.err_type = err_type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type, "param": None, "code": self.status}}


@dataclass(frozen=True, slots=True)
class Adapter:
    """A loaded adapter as vLLM's LoRARequest: name, int id (a block-event ``lora_id``), path, parent."""

    name: str
    lora_id: int
    path: str
    parent: str


def adapter_rank(path: str) -> int | None:
    """The rank ``r`` in ``path/adapter_config.json`` (PEFT's file), None when there is none."""
    config = Path(path) / "adapter_config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    rank = data.get("r") if isinstance(data, dict) else None
    return rank if isinstance(rank, int) else None


class AdapterRegistry:
    """Loaded adapters by name, with vLLM 0.24's load and unload checks (``OpenAIServingModels``)."""

    def __init__(self, config: LoRAConfig, base_model: str) -> None:
        self.config = config
        self.base_model = base_model
        self._adapters: dict[str, Adapter] = {}
        self._next_id = 0

    def get(self, name: str) -> Adapter | None:
        return self._adapters.get(name)

    def all(self) -> list[Adapter]:
        return list(self._adapters.values())

    def load(self, name: str, path: str, *, load_inplace: bool = False) -> Adapter:
        """Add an adapter; raises LoRAError with vLLM's message, type and status."""
        if not name or not path:
            raise LoRAError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        current = self._adapters.get(name)
        if current is not None and not load_inplace:
            raise LoRAError(
                400,
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                "in place, set 'load_inplace' to True.",
                "InvalidUserInput",
            )
        cfg = self.config
        if not cfg.enabled:
            # the worker's _ensure_lora_enabled, through the engine core's utility call
            raise LoRAError(
                500,
                "Call to add_lora method failed: LoRA is not enabled. Use --enable-lora to enable LoRA.",
                "InternalServerError",
            )
        if cfg.check_paths and not Path(path).is_dir():
            raise LoRAError(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
        rank = adapter_rank(path)
        if rank is not None and rank > cfg.max_lora_rank:
            raise LoRAError(
                500,
                f"Call to add_lora method failed: LoRA rank {rank} is greater than max_lora_rank "
                f"{cfg.max_lora_rank}.",
                "InternalServerError",
            )
        if current is not None:
            lora_id = current.lora_id
        else:
            self._next_id += 1
            lora_id = self._next_id
        adapter = Adapter(name=name, lora_id=lora_id, path=path, parent=self.base_model)
        self._adapters[name] = adapter
        return adapter

    def unload(self, name: str) -> Adapter:
        if not name:
            raise LoRAError(
                400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput"
            )
        adapter = self._adapters.pop(name, None)
        if adapter is None:
            raise LoRAError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        return adapter


@dataclass(frozen=True, slots=True)
class Activation:
    """What making one step's adapters resident cost: GPU slot copies, and disk reads before them."""

    swaps: int = 0  # adapters copied CPU -> GPU into a slot
    disk_loads: int = 0  # of those, adapters the CPU cache had dropped (read from disk again)


class AdapterSlots:
    """The worker's LRU caches of adapters: ``max_loras`` GPU slots over ``max_cpu_loras`` CPU copies."""

    def __init__(self, max_loras: int, max_cpu_loras: int) -> None:
        if max_cpu_loras < max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.gpu: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.cpu: OrderedDict[str, None] = OrderedDict()
        self.total_swaps = 0
        self.total_disk_loads = 0

    def add(self, name: str) -> None:
        """A runtime or startup load: the adapter is read into the CPU cache (add_lora)."""
        self._to_cpu(name)

    def remove(self, name: str) -> None:
        self.gpu.pop(name, None)
        self.cpu.pop(name, None)

    def activate(self, names: Iterable[str]) -> Activation:
        """Make ``names`` (at most ``max_loras``) resident in GPU slots, evicting the least recently
        used others; returns the copies it took."""
        wanted = list(dict.fromkeys(names))
        if len(wanted) > self.max_loras:
            raise ValueError(f"{len(wanted)} adapters in one step, max_loras is {self.max_loras}")
        swaps = disk = 0
        for name in wanted:
            if name in self.gpu:
                self.gpu.move_to_end(name)
                if name in self.cpu:
                    self.cpu.move_to_end(name)
                continue
            if name not in self.cpu:
                disk += 1
            self._to_cpu(name)
            if len(self.gpu) >= self.max_loras:
                victim = next(n for n in self.gpu if n not in wanted)
                del self.gpu[victim]
            self.gpu[name] = None
            swaps += 1
        self.total_swaps += swaps
        self.total_disk_loads += disk
        return Activation(swaps, disk)

    def _to_cpu(self, name: str) -> None:
        if name in self.cpu:
            self.cpu.move_to_end(name)
            return
        while len(self.cpu) >= self.max_cpu_loras:
            self.cpu.popitem(last=False)
        self.cpu[name] = None
