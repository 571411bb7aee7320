"""The shared LoRA client against real simulator processes serving vLLM 0.24's LoRA surface."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.engine_sim_server.conftest import MODEL, run_sim

from kvstack.common.lora import LoadedAdapter, LoraClient, LoraError


@pytest.fixture
async def client() -> AsyncIterator[LoraClient]:
    c = LoraClient(timeout=10)
    yield c
    await c.aclose()


async def test_load_list_unload(client: LoraClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_config.json").write_text(json.dumps({"r": 64, "target_modules": ["q_proj", "v_proj"]}))
    with run_sim("--enable-lora", "--max-loras", "2", "--max-lora-rank", "16") as sim:
        assert await client.loaded(sim.url) == ()
        await client.load(sim.url, "sql", "org/sql-lora")
        assert await client.ensure_loaded(sim.url, "sql", "org/sql-lora") is False
        assert await client.ensure_loaded(sim.url, "chat", "org/chat-lora") is True
        assert await client.loaded(sim.url) == (
            LoadedAdapter("sql", MODEL, "org/sql-lora"),
            LoadedAdapter("chat", MODEL, "org/chat-lora"),
        )
        with pytest.raises(LoraError) as err:
            await client.load(sim.url, "sql", "org/sql-lora")
        assert err.value.kind == "already_loaded"
        with pytest.raises(LoraError) as err:
            await client.load(sim.url, "big", str(big))
        assert (err.value.kind, err.value.status) == ("engine", 500)
        assert "greater than max_lora_rank" in err.value.message

        await client.unload(sim.url, "sql")
        assert [a.name for a in await client.loaded(sim.url)] == ["chat"]
        with pytest.raises(LoraError) as err:
            await client.unload(sim.url, "sql")
        assert err.value.kind == "not_loaded"
        assert await client.ensure_unloaded(sim.url, "sql") is False
        assert await client.ensure_unloaded(sim.url, "chat") is True


async def test_runtime_updating_off_is_disabled(client: LoraClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    with run_sim("--enable-lora") as sim:
        with pytest.raises(LoraError) as err:
            await client.load(sim.url, "sql", "org/sql-lora")
        assert err.value.kind == "disabled"
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in err.value.message
        assert await client.loaded(sim.url) == ()
