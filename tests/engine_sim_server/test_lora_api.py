"""The simulator's LoRA surface over HTTP: runtime load/unload and their errors, adapters in /v1/models,
requests served under an adapter, per-adapter prefix caching, KV events and vllm:lora_requests_info."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.engine_sim_server.conftest import run_sim
from tests.engine_sim_server.promtext import sample

from kvstack.common.kv_events import BlockStored, KVEvent
from kvstack.engine.sim.config import SimConfig
from kvstack.engine.sim.core import SimEngine
from kvstack.engine.sim.lora import LoRAConfig
from kvstack.engine.sim.server import SimServer
from kvstack.engine.sim.types import EngineCore, EventSink, StatsListener

PROMPT = "one two three four five six seven eight nine ten " * 8


class Recorded:
    """A SimServer whose engine's KV events are kept, over an in-process ASGI client."""

    def __init__(self, lora: LoRAConfig) -> None:
        self.events: list[KVEvent] = []

        def factory(config: SimConfig, stats: StatsListener, sink: EventSink) -> EngineCore:
            def record(events: Sequence[KVEvent]) -> None:
                self.events.extend(events)
                sink(events)

            return SimEngine(config, stats, record)

        config = SimConfig(
            served_model_names=["base"], max_model_len=1024, num_gpu_blocks=400, speed=100, lora=lora
        )
        self.app = SimServer(config, factory)


async def _client(lora: LoRAConfig) -> AsyncIterator[tuple[httpx.AsyncClient, Recorded]]:
    rec = Recorded(lora)
    await rec.app.start()
    try:
        transport = httpx.ASGITransport(app=rec.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
            yield client, rec
    finally:
        await rec.app.stop()


@pytest.fixture
async def lora_sim() -> AsyncIterator[tuple[httpx.AsyncClient, Recorded]]:
    async for pair in _client(LoRAConfig(enabled=True, max_loras=2, runtime_updating=True)):
        yield pair


async def _complete(http: httpx.AsyncClient, model: str, prompt: str = PROMPT) -> httpx.Response:
    return await http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 2})


async def test_load_serve_list_unload(lora_sim: tuple[httpx.AsyncClient, Recorded]) -> None:
    http, _ = lora_sim
    r = await http.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/adapters/sql"})
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'sql' added successfully.")
    cards = {m["id"]: m for m in (await http.get("/v1/models")).json()["data"]}
    assert cards["sql"]["parent"] == "base" and cards["sql"]["root"] == "/adapters/sql"
    assert cards["base"]["parent"] is None
    r = await _complete(http, "sql")
    assert r.status_code == 200 and r.json()["model"] == "sql"
    r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'sql' removed successfully.")
    r = await _complete(http, "sql")
    assert r.status_code == 404
    assert r.json()["error"] == {
        "message": "The model `sql` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
    assert "sql" not in {m["id"] for m in (await http.get("/v1/models")).json()["data"]}


@pytest.mark.parametrize(
    ("path", "body", "status", "err_type"),
    [
        ("/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": "/elsewhere"}, 400, "InvalidUserInput"),
        ("/v1/unload_lora_adapter", {"lora_name": "ghost"}, 404, "NotFoundError"),
        ("/v1/load_lora_adapter", {"lora_name": "x"}, 400, "BadRequestError"),  # lora_path missing
    ],
)
async def test_load_errors(
    lora_sim: tuple[httpx.AsyncClient, Recorded], path: str, body: dict[str, str], status: int, err_type: str
) -> None:
    http, _ = lora_sim
    assert (
        await http.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/a"})
    ).status_code == 200
    r = await http.post(path, json=body)
    assert r.status_code == status
    assert r.json()["error"]["type"] == err_type


async def test_runtime_routes_need_the_env_switch() -> None:
    async for http, _ in _client(LoRAConfig(enabled=True, runtime_updating=False)):
        r = await http.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/a"})
        assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})


async def test_loading_without_enable_lora_is_vllms_500() -> None:
    async for http, _ in _client(LoRAConfig(enabled=False, runtime_updating=True)):
        r = await http.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/a"})
        assert r.status_code == 500
        assert "LoRA is not enabled. Use --enable-lora to enable LoRA." in r.json()["error"]["message"]
        assert "vllm:lora_requests_info" not in (await http.get("/metrics")).text


async def test_same_prompt_under_two_adapters_never_shares_kv(
    lora_sim: tuple[httpx.AsyncClient, Recorded],
) -> None:
    http, rec = lora_sim
    for name in ("a", "b"):
        await http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": f"/adapters/{name}"})

    async def cached(model: str) -> int:
        r = await _complete(http, model)
        return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    assert await cached("a") == 0
    assert await cached("b") == 0  # same prompt, other adapter: nothing shared
    assert await cached("base") == 0  # nor with the base model
    assert await cached("a") > 0  # the adapter's own blocks are hit
    stored = [e for e in rec.events if isinstance(e, BlockStored)]
    assert {(e.lora_id, e.lora_name) for e in stored} == {(1, "a"), (2, "b"), (None, None)}


def _lora_info(text: str) -> list[tuple[dict[str, str], float]]:
    for family in text_string_to_metric_families(text):
        if family.name == "vllm:lora_requests_info":
            return [(dict(s.labels), s.value) for s in family.samples]
    return []


async def test_lora_requests_info_and_swaps(lora_sim: tuple[httpx.AsyncClient, Recorded]) -> None:
    http, _ = lora_sim
    for name in ("a", "b", "c"):
        await http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": f"/adapters/{name}"})
    for name in ("a", "b", "c", "a"):  # two slots: c evicts a, a comes back: 4 copies
        assert (await _complete(http, name, f"{name} only")).status_code == 200
    text = (await http.get("/metrics")).text
    series = _lora_info(text)
    assert series and all(labels["max_lora"] == "2" for labels, _ in series)
    latest = max(series, key=lambda s: s[1])[0]
    assert latest["running_lora_adapters"] in ("a", "")  # the last step ran a (or finished it)
    assert {labels["running_lora_adapters"] for labels, _ in series} >= {"a", "b", "c"}
    assert sample(text, "kvstack_sim_lora_swaps_total", model_name="base") == 4


def test_cli_flags_and_static_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "true")
    args = (
        "--enable-lora",
        "--max-loras",
        "2",
        "--max-cpu-loras",
        "4",
        "--lora-modules",
        "fin=/adapters/fin",
    )
    with run_sim(*args) as sim:
        cards = {m["id"]: m for m in httpx.get(f"{sim.base_url}/models").json()["data"]}
        assert cards["fin"]["parent"] == "sim-model" and cards["fin"]["root"] == "/adapters/fin"
        r = httpx.post(f"{sim.base_url}/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"})
        assert r.status_code == 200
        r = httpx.post(f"{sim.base_url}/completions", json={"model": "x", "prompt": "hi", "max_tokens": 1})
        assert r.status_code == 200 and r.json()["model"] == "x"
        assert 'max_lora="2"' in sim.metrics()
