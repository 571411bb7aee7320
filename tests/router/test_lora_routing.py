"""LoRA adapters through the router, with the openai SDK, in front of two real simulators: an adapter
goes only where it is loaded, its KV is scored apart from other adapters', a declared adapter that no
engine holds is loaded while its request waits, and an unloaded adapter stops being routed there."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from kvstack.common import tokenizer
from kvstack.common.blocks import block_keys
from kvstack.common.lora import LoraClient
from kvstack.common.waits import wait_until
from kvstack.router.ejection import OutlierTrack
from kvstack.router.kvindex.keys import request_root
from kvstack.router.policies.cache_aware import CacheAwarePolicy

from .conftest import FAST_MONITOR, MODEL, RouterFactory, RouterServer, Sim, run_event_sims, run_sims

BS = 16
DOC = "Adapters share the base model's weights but never its cached keys and values. " * 12
NAMES = ("engine-0", "engine-1")


@pytest.fixture(scope="module")
def lora_sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[Sim], Path]]:
    """Two fast simulators with LoRA and runtime loading on, publishing KV events."""
    lora = ("--enable-lora", "--max-loras", "2", "--max-cpu-loras", "8")
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}
    with run_event_sims(tmp_path_factory.mktemp("lora-sims"), *lora, block_size=BS, env=env) as running:
        yield running


def _client(r: RouterServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _complete(client: openai.OpenAI, model: str, prompt: str) -> str:
    """The engine that served the completion (the router's engine header)."""
    raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=2)
    assert raw.parse().model == model
    return raw.headers["x-kvstack-engine"]


def _lora(action: str, sim: Sim, name: str, source: str | None = None) -> None:
    """Load (from ``source``, else ``org/NAME``) or unload adapter ``name`` on ``sim`` directly."""

    async def call() -> None:
        client = LoraClient(timeout=10)
        try:
            if action == "load":
                await client.ensure_loaded(sim.url, name, source or f"org/{name}")
            else:
                await client.ensure_unloaded(sim.url, name)
        finally:
            await client.aclose()

    asyncio.run(call())


@contextmanager
def _lora_sims(tmp_path: Path, check_paths: Sequence[bool]) -> Iterator[list[Sim]]:
    """Simulators with runtime LoRA loading, one per entry of ``check_paths``: an engine that checks
    adapter paths refuses a missing folder with vLLM's 404, one that does not loads any path."""
    configs = []
    for i, check in enumerate(check_paths):
        config = tmp_path / f"sim-{i}.yaml"
        lora = {"enabled": True, "check_paths": check, "runtime_updating": True}
        config.write_text(yaml.safe_dump({"lora": lora}))
        configs.append(config)
    with run_sims(tmp_path, len(configs), each=lambda i: ["--config", str(configs[i])]) as sims:
        yield sims


def _served_by(r: RouterServer, adapter: str) -> set[str]:
    """Engines the router believes hold ``adapter`` (learnt from their /v1/models)."""
    return {e.name for e in r.ctx.registry.all() if adapter in e.models and e.adapters.get(adapter) == MODEL}


def _make_router(router: RouterFactory, engines_file: Path, **extra: Any) -> RouterServer:
    monitor = {**FAST_MONITOR, "models_interval": 0.3}
    return router(
        engines_file=engines_file,
        policy="cache_aware",
        expose_engine_header=True,
        available=2,
        tokenize_defer_max_chars=0,
        monitor=monitor,
        **extra,
    )


def test_an_adapter_loaded_on_one_engine_only_goes_there(
    lora_sims: tuple[list[Sim], Path], router: RouterFactory
) -> None:
    sims, engines_file = lora_sims
    _lora("load", sims[1], "only-one")
    r = _make_router(router, engines_file)
    wait_until(lambda: _served_by(r, "only-one") == {"engine-1"}, "the router to learn the adapter", 10, 0.05)
    client = _client(r)
    assert {_complete(client, "only-one", f"question {i}: {DOC[: 40 * i]}") for i in range(1, 7)} == {
        "engine-1"
    }
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="never-loaded", prompt="hi", max_tokens=1)
    assert "does not exist" in str(err.value)


def test_the_same_prompt_under_two_adapters_is_scored_apart(
    lora_sims: tuple[list[Sim], Path], router: RouterFactory
) -> None:
    sims, engines_file = lora_sims
    for sim in sims:
        _lora("load", sim, "style-a")
        _lora("load", sim, "style-b")
    r = _make_router(router, engines_file)
    wait_until(lambda: _served_by(r, "style-b") == set(NAMES), "both adapters on both engines", 10, 0.05)
    client = _client(r)
    predicted = "kvstack_router_predicted_hit_tokens_total"

    def predicted_now() -> float:
        return r.metric(predicted, policy="cache_aware")

    def engine_hits() -> float:
        return sum(s.metric("vllm:prefix_cache_hits_total") for s in sims)

    home = _complete(client, "style-a", DOC)
    policy = r.ctx.policy
    assert isinstance(policy, CacheAwarePolicy)
    home_url = next(s.url for s, name in zip(sims, NAMES, strict=True) if name == home)

    def confirmed(lora: str | None, url: str = home_url) -> int:
        """Blocks of DOC under ``lora`` the index holds from the engine's events (looked up past
        the speculative entries' expiry, so only what the engine reported counts)."""
        keys = block_keys(tokenizer.encode(DOC), BS, request_root(MODEL, lora, None))
        later = r.ctx.clock() + policy.index.settings.speculative_ttl_s + 1
        return policy.index.match(url, keys, later).gpu_blocks

    wait_until(lambda: confirmed("style-a") > 0, "the adapter's blocks from its KV events", 10, 0.05)
    assert confirmed("style-b") == 0 and confirmed(None) == 0  # scoped by adapter, not shared
    before, hits_before = predicted_now(), engine_hits()
    assert _complete(client, "style-a", DOC) == home  # its own blocks win
    gained = predicted_now() - before
    assert gained > 0
    wait_until(lambda: engine_hits() - hits_before > 0, "the engine's own hit", 5, 0.05)
    assert engine_hits() - hits_before == pytest.approx(gained, rel=0.1)  # predicted as the engine found
    before, hits_before = predicted_now(), engine_hits()
    _complete(client, "style-b", DOC)  # same prompt, other adapter: nothing to hit anywhere
    assert predicted_now() - before == 0
    assert engine_hits() - hits_before == 0


def test_a_declared_adapter_nobody_holds_is_loaded_while_its_request_waits(
    lora_sims: tuple[list[Sim], Path], router: RouterFactory
) -> None:
    sims, engines_file = lora_sims
    declared = [{"name": "on-demand", "model": MODEL, "source": "/adapters/on-demand"}]
    r = _make_router(router, engines_file, adapters=declared, hold_timeout_s=30)
    client = _client(r)
    engine = _complete(client, "on-demand", "held until its adapter is loaded")
    loaded_on = {
        name
        for sim, name in zip(sims, NAMES, strict=True)
        if "on-demand" in {m["id"] for m in httpx.get(f"{sim.url}/v1/models").json()["data"]}
    }
    assert loaded_on == {engine}  # loaded once, on one engine, and served there
    assert r.metric("kvstack_router_queued_requests", model_name="on-demand") == 0  # none held now
    assert {_complete(client, "on-demand", f"again {i}") for i in range(3)} == {engine}
    listed = {m.id for m in client.models.list()}
    assert "on-demand" in listed


def test_a_declared_adapter_whose_only_engine_is_ejected_is_loaded_on_another(
    lora_sims: tuple[list[Sim], Path], router: RouterFactory
) -> None:
    """Panic routing (router/engines.py ``routable``) sends a model's requests to its ejected
    engines when no other serves it; a declared adapter can be loaded on an available engine of its
    base model instead, so its request waits for that, not for the engine whose failures ejected it."""
    sims, engines_file = lora_sims
    _lora("load", sims[1], "ejected-home")
    declared = [{"name": "ejected-home", "model": MODEL, "source": "org/ejected-home"}]
    r = _make_router(router, engines_file, adapters=declared, hold_timeout_s=30)
    wait_until(lambda: _served_by(r, "ejected-home") == {"engine-1"}, "the adapter learnt", 10, 0.05)
    home = next(e for e in r.ctx.registry.all() if e.name == "engine-1")
    # the state the passive ejection leaves after engine-1's 5xx answers (router/ejection.py)
    home.outlier = OutlierTrack(ejections=1, ejected_until=r.ctx.clock() + 300)
    assert _complete(_client(r), "ejected-home", "served where it can be loaded") == "engine-0"
    assert _served_by(r, "ejected-home") == {"engine-0", "engine-1"}


def test_an_unloaded_adapter_stops_being_routed_and_a_declared_one_is_loaded_again(
    lora_sims: tuple[list[Sim], Path], router: RouterFactory
) -> None:
    sims, engines_file = lora_sims
    for sim in sims:
        _lora("load", sim, "passing")
        _lora("load", sim, "kept")
    declared = [{"name": "kept", "model": MODEL, "source": "org/kept"}]
    r = _make_router(router, engines_file, adapters=declared, hold_timeout_s=30)
    wait_until(lambda: _served_by(r, "passing") == set(NAMES), "the adapter on both engines", 10, 0.05)
    _lora("unload", sims[0], "passing")
    wait_until(lambda: _served_by(r, "passing") == {"engine-1"}, "the router to see the unload", 10, 0.05)
    client = _client(r)
    assert {_complete(client, "passing", f"after unload {i}") for i in range(5)} == {"engine-1"}
    _lora("unload", sims[1], "passing")
    wait_until(lambda: not _served_by(r, "passing"), "the router to see it gone", 10, 0.05)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="passing", prompt="hi", max_tokens=1)
    # a declared adapter unloaded everywhere is loaded again for the next request
    for sim in sims:
        _lora("unload", sim, "kept")
    wait_until(lambda: not _served_by(r, "kept"), "the router to see it gone", 10, 0.05)
    assert _complete(client, "kept", "served again") in NAMES


def test_adapters_of_engines_whose_models_discovery_names_are_learnt(
    lora_sims: tuple[list[Sim], Path], router: RouterFactory, tmp_path: Path
) -> None:
    sims, engines_file = lora_sims
    named = [{**entry, "models": [MODEL]} for entry in yaml.safe_load(engines_file.read_text())]
    named_file = tmp_path / "named.yaml"
    named_file.write_text(yaml.safe_dump(named))
    _lora("load", sims[0], "named-too")
    declared = [{"name": "named-too", "model": MODEL, "source": "org/named-too"}]
    r = _make_router(router, named_file, adapters=declared, hold_timeout_s=30)
    wait_until(lambda: _served_by(r, "named-too") == {"engine-0"}, "the adapter learnt", 10, 0.05)
    assert _complete(_client(r), "named-too", "hello") == "engine-0"


def test_a_declared_adapter_no_engine_can_load_fails_its_held_request_with_the_reason(
    router: RouterFactory, tmp_path: Path
) -> None:
    with _lora_sims(tmp_path, [True, True]) as sims:  # both refuse the missing folder
        declared = [{"name": "missing", "model": MODEL, "source": "/no/such/adapter"}]
        r = router(engines=[s.url for s in sims], adapters=declared, hold_timeout_s=60)
        with pytest.raises(openai.APIStatusError) as err:
            _client(r).completions.create(model="missing", prompt="hi", max_tokens=1)
        assert err.value.status_code == 502
        assert "No adapter found for /no/such/adapter" in err.value.message
        assert r.metric("kvstack_router_queued_requests", model_name="missing") == 0


def test_a_declared_adapter_that_loads_nowhere_else_is_served_by_its_ejected_engine(
    router: RouterFactory, tmp_path: Path
) -> None:
    """The other side of the test above: when the engine of the base model refuses to load the
    adapter (its source is missing there), the request goes to the ejected holder, not a 502."""
    with _lora_sims(tmp_path, [True, False]) as sims:  # the second loads a path it does not have
        source = str(tmp_path / "only-on-the-lax-node")  # absent: the first engine refuses it
        _lora("load", sims[1], "node-local", source)
        declared = [{"name": "node-local", "model": MODEL, "source": source}]
        r = router(
            engines=[s.url for s in sims], adapters=declared, hold_timeout_s=30, expose_engine_header=True
        )
        wait_until(lambda: bool(_served_by(r, "node-local")), "the adapter learnt", 10, 0.05)
        (name,) = _served_by(r, "node-local")
        holder = next(e for e in r.ctx.registry.all() if e.name == name)
        holder.outlier = OutlierTrack(ejections=1, ejected_until=r.ctx.clock() + 300)
        raw = _client(r).completions.with_raw_response.create(model="node-local", prompt="hi", max_tokens=1)
        assert raw.http_response.status_code == 200
        assert raw.headers["x-kvstack-engine"] == name
