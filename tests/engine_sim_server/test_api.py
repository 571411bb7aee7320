"""The OpenAI API of a real simulator process, driven by the real ``openai`` SDK (sync and async)."""

from __future__ import annotations

import httpx
import openai
import pytest
from tests.engine_sim_server.conftest import MODEL, Sim, run_sim

from kvstack.common.tokenizer import decode, encode

PROMPT = "The quick brown fox jumps over the lazy dog. " * 4


def client(sim: Sim, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.base_url, api_key="unused", max_retries=0, **kw)  # type: ignore[arg-type]


def test_completion_non_streaming(sim: Sim) -> None:
    r = client(sim).completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=7, extra_body={"ignore_eos": True}
    )
    assert r.id.startswith("cmpl-")
    assert r.object == "text_completion"
    assert r.model == MODEL
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    assert len(encode(choice.text)) == 7  # each generated token re-encodes to one token
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(encode(PROMPT))
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens is not None


def test_completion_stream_with_usage(sim: Sim) -> None:
    stream = client(sim).completions.create(
        model=MODEL,
        prompt=PROMPT + "stream",
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert len(encode(text)) == 12
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_token_id_prompt_matches_text_prompt(sim: Sim) -> None:
    ids = encode(PROMPT + "ids")
    c = client(sim)
    by_ids = c.completions.create(model=MODEL, prompt=ids, max_tokens=5, extra_body={"ignore_eos": True})
    by_text = c.completions.create(
        model=MODEL, prompt=decode(ids), max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(ids)
    assert by_ids.choices[0].text == by_text.choices[0].text  # output depends on the prompt's tokens only
    assert by_text.usage is not None and by_text.usage.prompt_tokens_details is not None
    assert (by_text.usage.prompt_tokens_details.cached_tokens or 0) > 0  # the second run hit the first's


def test_stop_string_truncates_and_reports_stop(sim: Sim) -> None:
    c = client(sim)
    full = c.completions.create(
        model=MODEL, prompt=PROMPT + "stop", max_tokens=20, extra_body={"ignore_eos": True}
    )
    text = full.choices[0].text
    stop = text[10:16]  # a string that occurs in the output
    cut = text.index(stop)
    for stream in (False, True):
        r = c.completions.create(
            model=MODEL,
            prompt=PROMPT + "stop",
            max_tokens=20,
            stop=[stop, "never-occurs"],
            stream=stream,
            extra_body={"ignore_eos": True},
        )
        if isinstance(r, openai.Stream):
            chunks = [ch for ch in r if ch.choices]
            got = "".join(ch.choices[0].text for ch in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            assert not stream
            got, finish = r.choices[0].text, r.choices[0].finish_reason
        assert got == text[:cut]
        assert finish == "stop"


def test_chat_non_streaming_and_max_completion_tokens(sim: Sim) -> None:
    r = client(sim).chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Say something."}]},
        ],
        max_completion_tokens=6,
        max_tokens=50,
        extra_body={"ignore_eos": True},
        user="u-1",
        temperature=0.7,
        top_p=0.9,
    )
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert len(encode(r.choices[0].message.content or "")) == 6
    assert r.choices[0].finish_reason == "length"


async def test_async_chat_stream(sim: Sim) -> None:
    c = openai.AsyncOpenAI(base_url=sim.base_url, api_key="unused", max_retries=0)
    stream = await c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "cache_salt": "tenant-a"},
    )
    chunks = [ch async for ch in stream]
    await c.close()
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert len(encode(content)) == 9
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9


async def test_async_completion(sim: Sim) -> None:
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="unused", max_retries=0) as c:
        r = await c.completions.create(model=MODEL, prompt=[1, 2, 3, 400], max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_unknown_model_is_404(sim: Sim) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client(sim).completions.create(model="nope", prompt="hi", max_tokens=2)
    assert err.value.status_code == 404
    assert err.value.body is not None
    assert err.value.body["message"] == "The model `nope` does not exist."  # type: ignore[index]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "n": 2}, "n > 1"),
        ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream=True"),
        ({"prompt": "x " * 3000, "max_tokens": 5}, "maximum context length is 2048 tokens"),
        ({"prompt": [10**9]}, "out of vocabulary"),
        ({"max_tokens": 5}, "prompt"),
    ],
)
def test_bad_requests_are_400(sim: Sim, body: dict[str, object], needle: str) -> None:
    r = httpx.post(f"{sim.base_url}/completions", json={"model": MODEL, **body}, timeout=10)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "BadRequestError" and err["code"] == 400
    assert needle in err["message"]


def test_invalid_json_is_400(sim: Sim) -> None:
    r = httpx.post(
        f"{sim.base_url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "BadRequestError"


def test_openai_sdk_raises_bad_request_for_long_prompt(sim: Sim) -> None:
    with pytest.raises(openai.BadRequestError):
        client(sim).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "word " * 3000}], max_tokens=10
        )


def test_models_tokenize_detokenize_version_health(sim: Sim) -> None:
    models = client(sim).models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "vllm"
    raw = httpx.get(f"{sim.base_url}/models").json()["data"][0]
    assert raw["max_model_len"] == 2048 and raw["parent"] is None and raw["permission"]
    tok = httpx.post(f"{sim.url}/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert tok == {
        "count": len(encode("Hello world")),
        "max_model_len": 2048,
        "tokens": encode("Hello world"),
        "token_strs": None,
    }
    chat_tok = httpx.post(
        f"{sim.url}/tokenize",
        json={"messages": [{"role": "user", "content": "hi"}], "return_token_strs": True},
    ).json()
    assert chat_tok["count"] == len(chat_tok["tokens"]) == len(chat_tok["token_strs"])
    detok = httpx.post(f"{sim.url}/detokenize", json={"tokens": tok["tokens"]}).json()
    assert detok == {"prompt": "Hello world"}
    assert httpx.get(f"{sim.url}/version").json() == {"version": "0.24.0"}
    health = httpx.get(f"{sim.url}/health")
    assert health.status_code == 200 and health.content == b""
    assert httpx.get(f"{sim.url}/nope").status_code == 404


def test_api_key_guards_v1_only() -> None:
    with run_sim("--speed", "50", "--api-key", "s3cret") as s:
        r = httpx.post(f"{s.base_url}/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.base_url, api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=s.base_url, api_key="s3cret", max_retries=0)
        assert ok.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices
        assert httpx.get(f"{s.url}/health").status_code == 200  # not under /v1
