"""Stored responses in the simulator, as vLLM 0.24 keeps them with VLLM_ENABLE_RESPONSES_API_STORE:
retrieve, cancel (refused: the response is finished), previous_response_id continuing the
conversation, vLLM's 404 for an unknown id and its 400 for a malformed one; with the store off
``store`` is ignored. In process over the real SimEngine, driven with the openai SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import openai
import pytest
from tests.engine_sim_server.conftest import inprocess_sim

from kvstack.common.tokenizer import apply_chat_template
from kvstack.engine.sim import responses
from kvstack.engine.sim.config import SimConfig
from kvstack.engine.sim.responses import STORE_ENV, store_enabled


@asynccontextmanager
async def sdk(store: bool, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[openai.AsyncOpenAI]:
    monkeypatch.setenv(STORE_ENV, "1" if store else "0")
    config = SimConfig(served_model_names=["m"], max_model_len=1024, num_gpu_blocks=400, speed=100)
    async with inprocess_sim(config) as http:
        yield openai.AsyncOpenAI(base_url="http://sim/v1", api_key="x", http_client=http, max_retries=0)


@pytest.mark.parametrize(
    ("value", "on"), [("1", True), ("2", True), ("0", False), ("", False), ("true", False)]
)
def test_the_store_switch_reads_like_vllms_integer_flag(value: str, on: bool) -> None:
    assert store_enabled({STORE_ENV: value}) is on
    assert store_enabled({}) is False


async def test_a_stored_response_is_retrieved_and_cannot_be_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with sdk(True, monkeypatch) as client:
        made = await client.responses.create(model="m", input="remember me", max_output_tokens=4)
        got = await client.responses.retrieve(made.id)
        assert got.model_dump() == made.model_dump()
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.cancel(made.id)
        assert refused.value.body["message"] == "Cannot cancel a synchronous response."  # type: ignore[index]
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.responses.retrieve("resp_0123")
        assert unknown.value.body["message"] == "Response with id 'resp_0123' not found."  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            await client.responses.cancel("resp_0123")
        with pytest.raises(openai.BadRequestError) as malformed:
            await client.responses.retrieve("chatcmpl-1")
        assert "Expected an ID that begins with 'resp'" in malformed.value.body["message"]  # type: ignore[index]
        with pytest.raises(openai.BadRequestError):
            await client.responses.cancel("resp")  # the prefix is resp_
        with pytest.raises(openai.BadRequestError):
            await client.responses.create(model="m", input="x", previous_response_id="msg_1")


async def test_a_streamed_response_is_stored_once_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    async with sdk(True, monkeypatch) as client:
        events = [e async for e in await client.responses.create(model="m", input="s", stream=True)]
        final = events[-1].response  # type: ignore[union-attr]
        got = await client.responses.retrieve(final.id)
        assert got.status == final.status and got.output_text == final.output_text


async def test_previous_response_id_continues_the_conversation(monkeypatch: pytest.MonkeyPatch) -> None:
    async with sdk(True, monkeypatch) as client:
        first = await client.responses.create(model="m", input="first turn", max_output_tokens=3)
        second = await client.responses.create(
            model="m", input="second turn", previous_response_id=first.id, max_output_tokens=3
        )
        assert second.previous_response_id == first.id
        conversation = [("user", "first turn"), ("assistant", first.output_text), ("user", "second turn")]
        assert second.usage is not None
        assert second.usage.input_tokens == len(apply_chat_template(conversation))
        unstored = await client.responses.create(model="m", input="x", store=False, max_output_tokens=1)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(unstored.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(model="m", input="y", previous_response_id=unstored.id)


async def test_with_the_store_off_nothing_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    async with sdk(False, monkeypatch) as client:
        made = await client.responses.create(model="m", input="forget me", max_output_tokens=2)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(made.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(model="m", input="again", previous_response_id=made.id)


async def test_the_store_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(responses, "MAX_STORED", 2)
    async with sdk(True, monkeypatch) as client:
        ids = [
            (await client.responses.create(model="m", input=f"n{i}", max_output_tokens=1)).id
            for i in range(3)
        ]
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(ids[0])  # the oldest went first
        assert [(await client.responses.retrieve(i)).id for i in ids[1:]] == ids[1:]
