"""An adapter unloaded from an engine behind the router's back (router/model_gone.py): the engine's
404 for it never reaches the client. The router forgets the adapter there at once (its /v1/models
re-read is 60 s away here) and retries on another engine, or holds a declared adapter until the
loader has loaded it again. Two real LoRA simulators, driven with the openai SDK."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from kvstack.common.waits import wait_until

from .conftest import FAST_MONITOR, MODEL, RouterFactory, RouterServer, Sim
from .test_lora_routing import NAMES, _client, _complete, _lora, _served_by, lora_sims

__all__ = ["lora_sims"]  # the module's fixture, used here too

SLOW_MODELS = {**FAST_MONITOR, "models_interval": 60.0}  # only the 404 can tell the router


def _router(router: RouterFactory, engines_file: Path, **extra: object) -> RouterServer:
    return router(
        engines_file=engines_file,
        policy="round_robin",  # every engine gets requests: the one that lost the adapter too
        expose_engine_header=True,
        available=2,
        monitor=SLOW_MODELS,
        **extra,
    )


def _listed(sim: Sim, adapter: str) -> bool:
    return adapter in {m["id"] for m in httpx.get(f"{sim.url}/v1/models", timeout=5).json()["data"]}


def test_an_adapter_unloaded_on_one_engine_is_served_by_the_other(
    lora_sims: tuple[list[Sim], Path], router: RouterFactory
) -> None:
    sims, engines_file = lora_sims
    for sim in sims:
        _lora("load", sim, "vanishing")
    r = _router(router, engines_file, eject_after_failures=1)  # a failure would eject at once
    wait_until(lambda: _served_by(r, "vanishing") == set(NAMES), "the adapter on both engines", 10, 0.05)
    _lora("unload", sims[0], "vanishing")
    client = _client(r)
    served = {_complete(client, "vanishing", f"after the unload {i}") for i in range(6)}
    assert served == {"engine-1"}  # every request answered 200, by the engine that still has it
    assert r.metric("kvstack_router_retries_total", model_name="vanishing", reason="model_gone") == 1
    assert _served_by(r, "vanishing") == {"engine-1"}  # forgotten on engine-0 after its one 404
    lost = r.ctx.registry.get(sims[0].url)
    assert lost is not None and lost.ejected_until == 0  # healthy: it serves its other models


def test_a_declared_adapter_unloaded_everywhere_is_held_and_loaded_again(
    lora_sims: tuple[list[Sim], Path], router: RouterFactory
) -> None:
    sims, engines_file = lora_sims
    _lora("load", sims[0], "comeback")
    declared = [{"name": "comeback", "model": MODEL, "source": "org/comeback"}]
    r = _router(router, engines_file, adapters=declared, hold_timeout_s=30)
    wait_until(lambda: _served_by(r, "comeback") == {"engine-0"}, "the adapter on engine-0", 10, 0.05)
    _lora("unload", sims[0], "comeback")
    client = _client(r)
    engine = _complete(client, "comeback", "asked after the unload")  # 200, not engine-0's 404
    assert engine in NAMES
    assert _listed(dict(zip(NAMES, sims, strict=True))[engine], "comeback")  # the loader loaded it again
    assert r.metric("kvstack_router_route_requests_total", route="/v1/completions", status="404") == 0


def test_an_adapter_nobody_declared_and_no_engine_has_is_the_engines_404(
    lora_sims: tuple[list[Sim], Path], router: RouterFactory
) -> None:
    sims, engines_file = lora_sims
    _lora("load", sims[1], "gone-for-good")
    r = _router(router, engines_file)
    wait_until(lambda: _served_by(r, "gone-for-good") == {"engine-1"}, "the adapter on engine-1", 10, 0.05)
    _lora("unload", sims[1], "gone-for-good")
    with pytest.raises(openai.NotFoundError) as err:
        _client(r).completions.create(model="gone-for-good", prompt="hi", max_tokens=1)
    assert "The model `gone-for-good` does not exist." in str(err.value)
    assert not _served_by(r, "gone-for-good")
