"""The simulator's LoRA routes, as vLLM 0.24's API server answers them.

``POST /v1/load_lora_adapter`` (``{lora_name, lora_path, load_inplace?}``) and
``POST /v1/unload_lora_adapter`` (``{lora_name}``) exist only when ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``
is true (otherwise the framework's ``{"detail": "Not Found"}``). Success is a 200 whose body is
vLLM's plain sentence with no content type; failures are the OpenAI error shape with vLLM's type
and status (:class:`kvstack.engine.sim.lora.AdapterRegistry`). Loaded adapters are listed in
``/v1/models`` with ``parent`` = the base model and ``root`` = the path, and a request naming one
is served under it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from kvstack.engine.sim import protocol as p
from kvstack.engine.sim.lora import Adapter, AdapterRegistry, LoRAConfig
from kvstack.engine.sim.types import EngineCore


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    lora_name: str
    lora_path: str
    load_inplace: bool = False
    is_3d_lora_weight: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    lora_name: str
    lora_int_id: int | None = None


class LoRAService:
    """The API server's adapters over one engine core: load, unload, list, resolve."""

    def __init__(self, config: LoRAConfig, base_model: str, engine: EngineCore) -> None:
        self.config = config
        self.registry = AdapterRegistry(config, base_model)
        self.engine = engine

    def load_static(self) -> None:
        """``--lora-modules``, loaded at startup; a failure stops the server (as vLLM's ValueError)."""
        for module in self.config.modules:
            try:
                self._load(module.name, module.path)
            except Exception as err:
                raise ValueError(str(err)) from err

    def load(self, body: bytes) -> str:
        req = p.parse(LoadLoRAAdapterRequest, body)
        self._load(req.lora_name, req.lora_path, load_inplace=req.load_inplace)
        return f"Success: LoRA adapter '{req.lora_name}' added successfully."

    def unload(self, body: bytes) -> str:
        req = p.parse(UnloadLoRAAdapterRequest, body)
        adapter = self.registry.unload(req.lora_name)
        self.engine.remove_lora(adapter.name)
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."

    def _load(self, name: str, path: str, *, load_inplace: bool = False) -> Adapter:
        adapter = self.registry.load(name, path, load_inplace=load_inplace)
        self.engine.add_lora(adapter.name)
        return adapter

    def resolve(self, name: str) -> Adapter | None:
        return self.registry.get(name)

    def model_cards(self, created: int) -> list[dict[str, Any]]:
        """vLLM's ModelCard of each loaded adapter, in load order."""
        return [p.model_card(a.name, a.path, a.parent, None, created) for a in self.registry.all()]
