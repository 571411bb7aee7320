"""LoRA adapters in the router: declared adapters, their KV scope, and loading one a request waits for.

An engine lists its loaded adapters in ``/v1/models`` with ``parent`` = its base model; the monitor
keeps them in :attr:`EngineState.adapters`, and each adapter is also one of the engine's
``models``, so a request naming an adapter goes only to engines that hold it (the registry's
candidates). Its block keys are scoped by (base model, adapter): the scope vLLM's KV events carry
(``lora_name``), so predicted hits count only the adapter's own blocks (:func:`kv_scope`).

A request for a *declared* adapter (``adapters:`` in the router config, rendered by the operator)
that no engine holds is held like a model at zero replicas (:mod:`kvstack.router.hold`). The hold
tells :class:`AdapterLoader`, which loads the adapter on the least-loaded available engine of its
base model (:func:`pick_engine`) through :class:`kvstack.common.lora.LoraClient`, then re-reads
that engine's ``/v1/models``; the registry's change wakes the held requests. An adapter nobody
declared and no engine holds is a 404, as an unknown model. A declared adapter whose holders are
all ejected is loaded on another engine the same way (:func:`kvstack.router.engines.routable`); if
none loads it, the loader gives it back to its ejected holders rather than fail the request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvstack.common.errors import OpenAIError
from kvstack.common.lora import ADAPTER_NAME, LoraClient, LoraError, source_kind
from kvstack.router.engines import EngineRegistry, EngineState

log = logging.getLogger(__name__)


class DeclaredAdapter(BaseModel):
    """One ``adapters:`` entry of the router config: what to load when a request asks for ``name``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=ADAPTER_NAME, description="the name clients send as model")
    model: str = Field(min_length=1, description="the base model (a served name) it applies to")
    source: str = Field(min_length=1, description="lora_path for the engine: Hub repo id, path or URL")

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if source_kind(value) is None:
            raise ValueError("must be a Hub repo id (org/name), an absolute path, or an http(s) URL")
        return value


def check_declared(adapters: Sequence[DeclaredAdapter]) -> None:
    """ValueError naming the first adapter declared twice or named like a base model."""
    names: set[str] = set()
    models = {a.model for a in adapters}
    for i, a in enumerate(adapters):
        if a.name in names:
            raise ValueError(f"adapters[{i}].name: {a.name!r} is declared twice")
        if a.name in models:
            raise ValueError(f"adapters[{i}].name: {a.name!r} is also a base model")
        names.add(a.name)


# ---- pure decisions ------------------------------------------------------------------------------


def kv_scope(model: str, candidates: Iterable[EngineState]) -> tuple[str, str | None]:
    """(base model, adapter) that scope a request's block keys, as its engines' KV events do.

    ``model`` is an adapter when a candidate lists it with a parent; otherwise it is a base model.
    """
    for st in candidates:
        parent = st.adapters.get(model)
        if parent is not None:
            return parent, model
    return model, None


def pick_engine(
    base_model: str, adapter: str, engines: Iterable[EngineState], now: float, exclude: Iterable[str] = ()
) -> EngineState | None:
    """The engine to load ``adapter`` on: available, serving ``base_model``, not holding it yet, not
    in ``exclude`` (engines that already refused), least loaded (ties: the fewest adapters, then the
    name). None when there is none."""
    skip = set(exclude)
    fit = [
        st
        for st in engines
        if st.available(now) and base_model in st.models and adapter not in st.models and st.url not in skip
    ]
    if not fit:
        return None
    return min(fit, key=lambda st: (st.load, len(st.adapters), st.name))


# ---- I/O -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class LoadOutcome:
    """The last load of one adapter: where it went, or why it failed."""

    engine: str | None = None
    error: str | None = None


class AdapterLoader:
    """Loads declared adapters that held requests wait for, one load at a time per adapter.

    ``refresh`` re-reads an engine's ``/v1/models`` (the monitor's ``refresh_models``); the
    registry's change then wakes the held requests. A failed load tries the next engine of the
    base model; when every available engine of it refused, ``fail`` ends the held requests with a
    502 naming the engines' answer (a wrong source, a rank over the limit: waiting cannot help).
    """

    def __init__(
        self,
        declared: Sequence[DeclaredAdapter],
        registry: EngineRegistry,
        client: LoraClient,
        refresh: Callable[[EngineState], Awaitable[bool]],
        *,
        fail: Callable[[str, Exception], int],
        clock: Callable[[], float],
        retry_s: float = 1.0,
        max_wait_s: float = 600.0,
    ) -> None:
        self.declared = {a.name: a for a in declared}
        self.registry = registry
        self.client = client
        self.refresh = refresh
        self.fail = fail
        self.clock = clock
        self.retry_s = retry_s
        self.max_wait_s = max_wait_s
        self.outcomes: dict[str, LoadOutcome] = {}
        self.loads = 0  # adapters this router loaded
        self.failures = 0
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._changed = asyncio.Event()
        registry.listeners.append(self._changed.set)

    def on_hold(self, model: str) -> None:
        """A request is held for ``model``: load it if it is a declared adapter not being loaded."""
        adapter = self.declared.get(model)
        if adapter is None or model in self._tasks:
            return
        task = asyncio.get_running_loop().create_task(self._load(adapter), name=f"load adapter {model}")
        self._tasks[model] = task
        task.add_done_callback(lambda _t: self._tasks.pop(model, None))

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.aclose()

    async def _load(self, adapter: DeclaredAdapter) -> None:
        deadline = self.clock() + self.max_wait_s
        refused: list[str] = []
        while self.clock() < deadline:
            now = self.clock()
            engines = self.registry.all()
            if self.registry.candidates(adapter.name, now):
                return  # another engine (or the operator) has it now
            engine = pick_engine(adapter.model, adapter.name, engines, now, refused)
            if engine is None and refused and any(adapter.name in e.models and e.healthy for e in engines):
                # its holders are only ejected and no other engine loads it: back to routing it to
                # them (engines.routable's last resort), not a 502 while a holder may answer
                log.warning("adapter %s loads nowhere else: its ejected engines serve it", adapter.name)
                self.registry.loadable = self.registry.loadable - {adapter.name}
                self.registry.changed()
                return
            if engine is None and refused:
                error = self.outcomes[adapter.name].error
                message = (
                    f"adapter {adapter.name!r} could not be loaded by any engine of {adapter.model}: {error}"
                )
                self.fail(adapter.name, OpenAIError(502, message, param="model"))
                return
            if engine is None:
                # no engine of the base model yet (scaling from zero): wait for a change
                self._changed.clear()
                try:
                    async with asyncio.timeout(self.retry_s):
                        await self._changed.wait()
                except TimeoutError:
                    pass
                continue
            try:
                loaded = await self.client.ensure_loaded(engine.url, adapter.name, adapter.source)
            except LoraError as err:
                self.failures += 1
                refused.append(engine.url)
                self.outcomes[adapter.name] = LoadOutcome(engine.name, f"{err.kind}: {err.message}")
                log.warning("loading adapter %s on %s failed: %s", adapter.name, engine.name, err.message)
                continue
            if loaded:
                self.loads += 1
                log.info("loaded adapter %s on %s for a held request", adapter.name, engine.name)
            self.outcomes[adapter.name] = LoadOutcome(engine.name, None)
            await self.refresh(engine)  # lists it: the registry's change wakes the held requests
            if adapter.name in engine.models:
                return
            refused.append(engine.url)  # loaded, yet not listed: try elsewhere
