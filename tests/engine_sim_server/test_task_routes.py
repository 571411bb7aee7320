"""The simulator's routes beyond completions and chat, in process over the real SimEngine: the
Responses API, audio, embeddings, pooling, classify, score and rerank, each answered in vLLM 0.24's
shapes, and 404 for the routes of tasks the model does not have (vLLM does not mount them)."""

from __future__ import annotations

import io
import json
import wave
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import openai
import pytest
from tests.engine_sim_server.conftest import inprocess_sim

from kvstack.common.tokenizer import apply_chat_template
from kvstack.engine.sim.config import SimConfig, Task
from kvstack.engine.sim.task_routes import TASK_PATHS

Client = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@asynccontextmanager
async def sim_client(*tasks: Task) -> AsyncIterator[httpx.AsyncClient]:
    config = SimConfig(served_model_names=["m"], max_model_len=1024, num_gpu_blocks=400, speed=100)
    async with inprocess_sim(config.model_copy(update={"tasks": list(tasks)})) as client:
        yield client


def wav_bytes(seconds: float, rate: int = 16_000) -> bytes:
    """A silent mono 16-bit WAV file of ``seconds``."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(b"\x00\x00" * int(seconds * rate))
    return buf.getvalue()


ALL_PATHS = sorted({path for paths in TASK_PATHS.values() for path in paths})


@pytest.mark.parametrize("task", ["generate", "transcription", "embed", "classify", "score"])
async def test_a_model_answers_only_its_tasks_routes(task: Task) -> None:
    async with sim_client(task) as http:
        for path in [*ALL_PATHS, "/v1/completions", "/v1/chat/completions"]:
            r = await http.post(path, json={"model": "m"})
            served = path in TASK_PATHS[task] or (task == "generate" and path.endswith("completions"))
            if served:
                assert r.status_code == 400, (path, r.text)  # reached its handler: the body is incomplete
                assert r.json()["error"]["type"] == "BadRequestError"
            else:
                assert (r.status_code, r.json()) == (404, {"detail": "Not Found"}), path


async def test_responses_with_the_openai_sdk() -> None:
    async with sim_client("generate") as http:
        client = openai.AsyncOpenAI(base_url="http://sim/v1", api_key="x", http_client=http, max_retries=0)
        reply = await client.responses.create(
            model="m",
            input="say hi",
            instructions="be brief",
            max_output_tokens=6,
            extra_body={"ignore_eos": True},
        )
        assert reply.object == "response" and reply.model == "m" and reply.output_text
        assert reply.status == "incomplete" and reply.incomplete_details is not None  # ran to the limit
        assert reply.usage is not None and reply.usage.output_tokens == 6
        prompt = apply_chat_template([("system", "be brief"), ("user", "say hi")])
        assert reply.usage.input_tokens == len(prompt)
        # the same prompt as a chat: the same tokens
        chat = (
            await http.post(
                "/tokenize",
                json={
                    "messages": [
                        {"role": "system", "content": "be brief"},
                        {"role": "user", "content": "say hi"},
                    ]
                },
            )
        ).json()
        assert chat["tokens"] == prompt

        events = [
            e
            async for e in await client.responses.create(
                model="m",
                input=[{"role": "user", "content": [{"type": "input_text", "text": "hello"}]}],
                max_output_tokens=5,
                stream=True,
                extra_body={"ignore_eos": True},
            )
        ]
        kinds = [e.type for e in events]
        assert kinds[:4] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
        assert kinds[-4:] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        final = events[-1].response  # type: ignore[union-attr]
        assert deltas and final.output_text == deltas and final.usage.output_tokens == 5


async def test_responses_bad_input_is_vllms_400() -> None:
    async with sim_client("generate") as http:
        for body, param in [
            ({"model": "m"}, "input"),
            ({"model": "m", "input": []}, "input"),
            ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ]:
            r = await http.post("/v1/responses", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        r = await http.post("/v1/responses", json={"model": "nope", "input": "x"})
        assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
        r = await http.post(
            "/v1/responses", json={"model": "m", "input": "x", "previous_response_id": "resp_1"}
        )
        assert r.status_code == 404 and r.json()["error"]["message"] == "Response with id 'resp_1' not found."


async def test_transcription_and_translation_with_the_openai_sdk() -> None:
    audio = wav_bytes(2.0)
    async with sim_client("transcription") as http:
        client = openai.AsyncOpenAI(base_url="http://sim/v1", api_key="x", http_client=http, max_retries=0)
        text = await client.audio.transcriptions.create(model="m", file=("a.wav", audio, "audio/wav"))
        assert text.text
        raw = await http.post(
            "/v1/audio/transcriptions", data={"model": "m"}, files={"file": ("a.wav", audio)}
        )
        assert raw.json()["usage"] == {"type": "duration", "seconds": 2}
        assert raw.json()["text"] == text.text  # the same audio, the same (deterministic) transcript
        # the openai SDK marks translations deprecated (OpenAI's API is dropping them); vLLM 0.24 serves them
        with pytest.warns(DeprecationWarning, match="deprecated"):
            translated = await client.audio.translations.create(model="m", file=("a.wav", audio, "audio/wav"))
        assert translated.text
        plain = await http.post(
            "/v1/audio/transcriptions",
            data={"model": "m", "response_format": "text"},
            files={"file": ("a.wav", audio)},
        )
        assert plain.headers["content-type"].startswith("text/plain") and plain.text == text.text
        stream = await http.post(
            "/v1/audio/transcriptions",
            data={"model": "m", "stream": "true"},
            files={"file": ("a.wav", audio)},
        )
        frames = [line[6:] for line in stream.text.split("\n") if line.startswith("data: ")]
        assert frames[-1] == "[DONE]"
        chunks = [json.loads(f) for f in frames[:-1]]
        assert {c["object"] for c in chunks} == {"transcription.chunk"}
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text.text


@pytest.mark.parametrize(
    ("files", "data", "status", "param"),
    [
        ({}, {"model": "m"}, 400, "file"),
        ({"file": ("a.wav", b"RIFF-not-a-wav")}, {"model": "m"}, 400, "file"),
        ({"file": ("a.wav", wav_bytes(0.5))}, {"model": "nope"}, 404, "model"),
        (
            {"file": ("a.wav", wav_bytes(0.5))},
            {"model": "m", "response_format": "srt"},
            400,
            "response_format",
        ),
    ],
)
async def test_audio_errors(files: dict[str, Any], data: dict[str, str], status: int, param: str) -> None:
    async with sim_client("transcription") as http:
        r = await http.post("/v1/audio/transcriptions", data=data, files=files or {"x": ("", b"")})
        assert r.status_code == status and r.json()["error"]["param"] == param, r.text


async def test_a_body_that_is_not_multipart_is_a_400() -> None:
    async with sim_client("transcription") as http:
        r = await http.post("/v1/audio/transcriptions", json={"model": "m"})
        assert r.status_code == 400 and "multipart" in r.json()["error"]["message"]


async def test_rerank_ranks_the_documents_that_answer_the_query_first() -> None:
    docs = ["the cat sat", "paris is the capital of france", "capital cities of europe"]
    async with sim_client("score") as http:
        for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
            r = await http.post(
                path, json={"model": "m", "query": "capital of france", "documents": docs, "top_n": 2}
            )
            body = r.json()
            assert r.status_code == 200 and body["id"].startswith("rerank-") and body["model"] == "m"
            assert [x["index"] for x in body["results"]] == [1, 2]
            assert body["results"][0]["document"] == {"text": docs[1], "multi_modal": None}
            assert body["results"][0]["relevance_score"] > body["results"][1]["relevance_score"]
            assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


async def test_score_pairs_one_to_many_and_many_to_many() -> None:
    async with sim_client("score") as http:
        r = await http.post(
            "/score", json={"model": "m", "text_1": "red apple", "text_2": ["red apple", "blue sky"]}
        )
        body = r.json()
        assert r.status_code == 200 and body["object"] == "list"
        assert [d["object"] for d in body["data"]] == ["score", "score"]
        assert body["data"][0]["score"] > body["data"][1]["score"]
        assert body["usage"]["completion_tokens"] == 0
        same = await http.post(
            "/v1/score", json={"model": "m", "queries": ["a", "b"], "documents": ["a", "c"]}
        )
        assert len(same.json()["data"]) == 2
        bad = await http.post("/score", json={"model": "m", "text_1": ["a", "b"], "text_2": ["a", "b", "c"]})
        assert bad.status_code == 400 and "1:1, 1:N or N:N" in bad.json()["error"]["message"]


async def test_embeddings_pooling_and_classify_shapes() -> None:
    async with sim_client("embed", "classify") as http:
        client = openai.AsyncOpenAI(base_url="http://sim/v1", api_key="x", http_client=http, max_retries=0)
        emb = await client.embeddings.create(model="m", input=["one", "two"])
        assert [d.index for d in emb.data] == [0, 1] and len(emb.data[0].embedding) == 64
        assert abs(sum(v * v for v in emb.data[0].embedding) - 1.0) < 1e-9
        again = await client.embeddings.create(model="m", input="one")
        assert again.data[0].embedding == emb.data[0].embedding
        pooled = (await http.post("/pooling", json={"model": "m", "input": "one"})).json()
        assert pooled["id"].startswith("pool-") and pooled["data"][0]["object"] == "pooling"
        classified = (await http.post("/classify", json={"model": "m", "input": ["good", "bad"]})).json()
        for item in classified["data"]:
            assert item["num_classes"] == 2 and abs(sum(item["probs"]) - 1.0) < 1e-9
            assert item["label"] in ("negative", "positive")


async def test_responses_clamp_max_output_tokens_to_the_context_as_vllm() -> None:
    async with sim_client("generate") as http:
        prompt = apply_chat_template([("user", "hi")])
        body = {"model": "m", "input": "hi", "max_output_tokens": 5000, "stream": True}
        r = await http.post("/v1/responses", json=body)
        created = json.loads(r.text.split("\n")[1][6:])
        assert created["response"]["max_output_tokens"] == 1024 - len(prompt)
        long = await http.post("/v1/responses", json={"model": "m", "input": "word " * 2000})
        assert long.status_code == 400 and "maximum context length is 1024" in long.json()["error"]["message"]


async def test_pooling_input_longer_than_the_context_is_a_400() -> None:
    async with sim_client("embed") as http:
        r = await http.post("/v1/embeddings", json={"model": "m", "input": "word " * 2000})
        assert r.status_code == 400 and "you requested 0 output tokens" in r.json()["error"]["message"]


@pytest.mark.parametrize("route", ["responses", "transcription"])
def test_a_client_that_leaves_mid_stream_aborts_its_request(route: str) -> None:
    from tests.engine_sim_server.conftest import MODEL, run_sim
    from tests.engine_sim_server.promtext import sample

    from kvstack.common.waits import wait_until

    with run_sim(
        "--speed", "1", "--task", "generate", "--task", "transcription", "--max-model-len", "4096"
    ) as sim:

        def aborted() -> float:
            return sample(sim.metrics(), "vllm:request_success_total", finished_reason="abort")

        if route == "responses":
            body = {"model": MODEL, "input": "a long answer", "max_output_tokens": 1500, "ignore_eos": True}
            request = httpx.Request("POST", f"{sim.base_url}/responses", json={**body, "stream": True})
        else:
            form = {"model": MODEL, "stream": "true", "max_completion_tokens": "1500"}
            files = {"file": ("a.wav", wav_bytes(1.0))}
            request = httpx.Request("POST", f"{sim.base_url}/audio/transcriptions", data=form, files=files)
        with httpx.Client(timeout=30) as http:
            response = http.send(request, stream=True)
            lines = response.iter_lines()  # kept: a dropped line iterator closes the response
            next(line for line in lines if line.startswith("data: ") and '"delta"' in line)
            running = lambda: sample(sim.metrics(), "vllm:num_requests_running") == 1  # noqa: E731
            wait_until(running, "the request running", 15, 0.02)
            response.close()  # most of the answer unsent
        wait_until(lambda: aborted() == 1, "the request aborted", 15, 0.05)
        assert sample(sim.metrics(), "vllm:num_requests_running") == 0


async def test_anthropic_messages_whole_and_streamed() -> None:
    async with sim_client("generate") as http:
        body = {
            "model": "m",
            "system": "be brief",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "say hi"}]}],
            "max_tokens": 6,
            "ignore_eos": True,
        }
        whole = (await http.post("/v1/messages", json=body)).json()
        assert whole["type"] == "message" and whole["role"] == "assistant" and whole["model"] == "m"
        assert whole["stop_reason"] == "max_tokens" and whole["content"][0]["type"] == "text"
        prompt = apply_chat_template([("system", "be brief"), ("user", "say hi")])
        assert whole["usage"] == {"input_tokens": len(prompt), "output_tokens": 6}
        stream = await http.post("/v1/messages", json={**body, "stream": True})
        frames = [f.split("\n") for f in stream.text.split("\n\n") if f]
        kinds = [f[0].removeprefix("event: ") for f in frames]
        assert kinds[:2] == ["message_start", "content_block_start"]
        assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
        data = [json.loads(f[1].removeprefix("data: ")) for f in frames]
        text = "".join(d["delta"]["text"] for d in data if d["type"] == "content_block_delta")
        assert text and data[-2]["usage"]["output_tokens"] == 6
        bad = await http.post("/v1/messages", json={**body, "max_tokens": 0})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
