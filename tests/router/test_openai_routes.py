"""Every OpenAI-compatible route vLLM 0.24 serves, through the router to real simulators: a
generating model, a reranker and a speech model, each behind its own engine. The real openai SDK
where it has the method (responses, audio), httpx for rerank and score."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import openai
import pytest
from tests.engine_sim_server.test_task_routes import wav_bytes

from kvstack.common.waits import wait_until
from kvstack.router.prompts import prompt_work
from kvstack.router.protocol import parse_request

from .conftest import MODEL, BadEngine, RouterFactory, RouterServer, Sim, run_sims
from .test_cache_routing import DOC, event_sims, sample, scrape

__all__ = ["event_sims"]  # the KV-event simulators' fixture, shared with the chat's cache tests

RERANK = {"query": "capital of france", "documents": ["the cat sat", "paris is the capital of france"]}


@dataclass
class Engines:
    gen: Sim  # model "gen": generate
    rank: Sim  # model "rank": score (score, rerank)
    asr: Sim  # model "asr": transcription

    @property
    def urls(self) -> list[str]:
        return [self.gen.url, self.rank.url, self.asr.url]


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    tmp = tmp_path_factory.mktemp("sims")
    with ExitStack() as stack:
        started = [
            stack.enter_context(run_sims(tmp, 1, "--served-model-name", name, "--speed", "20", *task))[0]
            for name, task in (
                ("gen", ()),
                ("rank", ("--task", "score")),
                ("asr", ("--task", "transcription")),
            )
        ]
        yield Engines(*started)


def answered(r: RouterServer, model: str, engine: Sim, status: str = "200") -> float:
    return r.metric("kvstack_router_requests_total", model_name=model, engine=engine.url, status=status)


def by_route(r: RouterServer, route: str, status: str) -> float:
    return r.metric("kvstack_router_route_requests_total", route=route, status=status)


def test_responses_with_the_openai_sdk_streamed_and_whole(
    engines: Engines, router: RouterFactory, backend: str
) -> None:
    r = router(engines=engines.urls, upstream_backend=backend)
    client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="x", max_retries=0)
    reply = client.responses.create(model="gen", input="hello there", max_output_tokens=5)
    assert reply.object == "response" and reply.model == "gen" and reply.output_text
    events = list(client.responses.create(model="gen", input="hello", max_output_tokens=4, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas and deltas == events[-1].response.output_text  # type: ignore[union-attr]

    def counted() -> tuple[float, float, float]:
        ttft = r.metric("kvstack_router_time_to_first_token_seconds_count", model_name="gen")
        return answered(r, "gen", engines.gen), by_route(r, "/v1/responses", "200"), ttft

    # the stream's head went out with its first text delta: its time to first token was measured
    wait_until(lambda: counted() == (2, 2, 1), "two responses from gen, one first token", 5, 0.01)


def test_a_response_and_a_message_are_keyed_like_the_same_chat() -> None:
    """Cache-aware routing: their messages are the chat's (same digest, same parts)."""
    chat = {
        "model": "m",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    }
    response = {"model": "m", "instructions": "be brief", "input": [{"role": "user", "content": "hi"}]}
    message = {
        "model": "m",
        "system": "be brief",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
    }
    a = prompt_work(parse_request("chat", msgspec.json.encode(chat)))
    b = prompt_work(parse_request("responses", msgspec.json.encode(response)))
    c = prompt_work(parse_request("messages", msgspec.json.encode(message)))
    assert a is not None and a == b == c
    other = prompt_work(
        parse_request("responses", msgspec.json.encode({**response, "instructions": "be long"}))
    )
    assert other != a


def test_anthropic_messages_whole_and_streamed(engines: Engines, router: RouterFactory) -> None:
    r = router(engines=engines.urls)
    body = {"model": "gen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    whole = httpx.post(f"{r.url}/v1/messages", json=body, timeout=10)
    assert (
        whole.status_code == 200 and whole.json()["type"] == "message" and whole.json()["content"][0]["text"]
    )
    with httpx.stream("POST", f"{r.url}/v1/messages", json={**body, "stream": True}, timeout=10) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("event: ") for line in resp.iter_lines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "message_stop" and "content_block_delta" in events

    def counted() -> tuple[float, float]:
        ttft = r.metric("kvstack_router_time_to_first_token_seconds_count", model_name="gen")
        return ttft, by_route(r, "/v1/messages", "200")

    wait_until(lambda: counted() == (1, 2), "two messages answered, one first token", 5, 0.01)


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank", "/score", "/v1/score"])
def test_rerank_and_score_reach_the_reranker(engines: Engines, router: RouterFactory, path: str) -> None:
    r = router(engines=engines.urls)
    body = (
        {"model": "rank", **RERANK}
        if "rerank" in path
        else {"model": "rank", "text_1": "a", "text_2": ["a", "b"]}
    )
    resp = httpx.post(f"{r.url}{path}", json=body, timeout=10)
    assert resp.status_code == 200, resp.text
    if "rerank" in path:
        assert [x["index"] for x in resp.json()["results"]] == [1, 0]
    else:
        assert [d["object"] for d in resp.json()["data"]] == ["score", "score"]
    wait_until(lambda: by_route(r, path, "200") == 1, f"one {path} answer counted", 5, 0.01)
    assert answered(r, "rank", engines.rank) == 1


def test_transcription_with_the_openai_sdk(engines: Engines, router: RouterFactory, backend: str) -> None:
    r = router(engines=engines.urls, upstream_backend=backend)  # the form's bytes, untouched by either
    client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="x", max_retries=0)
    text = client.audio.transcriptions.create(model="asr", file=("a.wav", wav_bytes(1.0), "audio/wav"))
    assert text.text
    translated = httpx.post(
        f"{r.url}/v1/audio/translations",
        data={"model": "asr"},
        files={"file": ("a.wav", wav_bytes(1.0))},
        timeout=10,
    )
    assert translated.status_code == 200 and translated.json()["text"] == text.text
    wait_until(lambda: answered(r, "asr", engines.asr) == 2, "two answers from the speech engine", 5, 0.01)
    assert by_route(r, "/v1/audio/transcriptions", "200") == by_route(r, "/v1/audio/translations", "200") == 1


def test_a_streamed_transcription_is_relayed_as_a_stream(engines: Engines, router: RouterFactory) -> None:
    r = router(engines=engines.urls)
    form = {"model": "asr", "stream": "true"}
    with httpx.stream(
        "POST",
        f"{r.url}/v1/audio/transcriptions",
        data=form,
        files={"file": ("a.wav", wav_bytes(2.0))},
        timeout=10,
    ) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        frames = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "data: [DONE]" and len(frames) > 2
    wait_until(
        lambda: r.metric("kvstack_router_time_to_first_token_seconds_count", model_name="asr") == 1,
        "the stream's first token measured",
        5,
        0.01,
    )


@pytest.mark.parametrize(
    ("path", "model"),
    [("/v1/responses", "rank"), ("/rerank", "gen"), ("/score", "asr"), ("/v1/audio/transcriptions", "gen")],
)
def test_a_route_the_models_engine_lacks_is_its_404(
    engines: Engines, router: RouterFactory, path: str, model: str
) -> None:
    """The engine of that model does not mount the route (vLLM): its 404, in the OpenAI shape."""
    r = router(engines=engines.urls)
    if path.startswith("/v1/audio"):
        resp = httpx.post(f"{r.url}{path}", data={"model": model}, files={"file": ("a.wav", wav_bytes(0.2))})
    else:
        resp = httpx.post(
            f"{r.url}{path}", json={"model": model, "input": "x", **RERANK, "text_1": "a", "text_2": "b"}
        )
    assert resp.status_code == 404
    assert resp.json()["error"] == {
        "message": "Not Found",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }


@pytest.mark.parametrize("path", ["/v1/responses", "/rerank", "/score", "/classify", "/pooling"])
def test_an_unknown_model_is_the_routers_404(engines: Engines, router: RouterFactory, path: str) -> None:
    r = router(engines=engines.urls)
    body = {"model": "nope", "input": "x", **RERANK, "text_1": "a", "text_2": "b"}
    resp = httpx.post(f"{r.url}{path}", json=body)
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "model"
    audio = httpx.post(
        f"{r.url}/v1/audio/transcriptions", data={"model": "nope"}, files={"file": ("a.wav", b"x")}
    )
    assert audio.status_code == 404 and "nope" in audio.json()["error"]["message"]


def test_bodies_over_the_limit_are_413(engines: Engines, router: RouterFactory) -> None:
    r = router(engines=engines.urls, max_body_bytes=2048)
    big = wav_bytes(1.0)  # 32 KB
    resp = httpx.post(
        f"{r.url}/v1/audio/transcriptions", data={"model": "asr"}, files={"file": ("a.wav", big)}
    )
    assert resp.status_code == 413 and resp.json()["error"]["type"] == "RequestTooLargeError"

    request = httpx.Request("POST", "http://x", data={"model": "asr"}, files={"file": ("a.wav", big)})
    body = request.read()
    resp = httpx.post(  # no Content-Length: refused as the bytes arrive
        f"{r.url}/v1/audio/transcriptions",
        content=iter([body[i : i + 1000] for i in range(0, len(body), 1000)]),
        headers={"content-type": request.headers["content-type"]},
    )
    assert resp.status_code == 413
    document = "word " * 1000
    resp = httpx.post(f"{r.url}/rerank", json={"model": "rank", "query": "q", "documents": [document]})
    assert resp.status_code == 413
    wait_until(
        lambda: r.metric("kvstack_router_rejections_total", reason="body_too_large") == 3, "3 refusals", 5
    )
    assert answered(r, "asr", engines.asr) == 0


@pytest.mark.parametrize(
    ("content", "content_type", "param"),
    [
        (b'{"model": "asr"}', "application/json", None),
        (
            b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nasr',
            "multipart/form-data; boundary=b",
            None,
        ),
        (
            b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nasr\r\n--b--',
            "multipart/form-data; boundary=b",
            "file",
        ),
        (
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nx\r\n--b--',
            "multipart/form-data; boundary=b",
            "model",
        ),
    ],
)
def test_malformed_audio_forms_are_400(
    engines: Engines, router: RouterFactory, content: bytes, content_type: str, param: str | None
) -> None:
    r = router(engines=engines.urls)
    resp = httpx.post(
        f"{r.url}/v1/audio/transcriptions", content=content, headers={"content-type": content_type}
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
    assert by_route(r, "/v1/audio/transcriptions", "400") == 1


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/responses", {"model": "gen"}, "input"),
        ("/v1/responses", {"model": "gen", "input": 3}, "input"),
        ("/v1/responses", {"model": "gen", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ("/v1/responses", {"model": "gen", "input": "x", "stream": "yes"}, "stream"),
        ("/rerank", {"model": "rank", "documents": ["a"]}, "query"),
        ("/rerank", {"model": "rank", "query": "q", "documents": []}, "documents"),
        ("/rerank", {"model": "rank", "query": "q", "documents": ["a"], "top_n": -1}, "top_n"),
        ("/score", {"model": "rank", "text_1": "a"}, "text_1"),
        ("/classify", {"model": "rank"}, "input"),
        ("/v2/rerank", {"query": "q", "documents": ["a"]}, "model"),
        ("/v1/messages", {"model": "gen", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        (
            "/v1/messages",
            {"model": "gen", "messages": [{"role": "tool", "content": "x"}], "max_tokens": 1},
            "messages",
        ),
    ],
)
def test_bad_bodies_are_the_routers_400(
    engines: Engines, router: RouterFactory, path: str, body: dict, param: str
) -> None:
    r = router(engines=engines.urls)
    resp = httpx.post(f"{r.url}{path}", json=body)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
    assert sum(answered(r, m, e) for m, e in (("gen", engines.gen), ("rank", engines.rank))) == 0


def test_a_failed_rerank_is_retried_on_another_engine(router: RouterFactory, tmp_path: Path) -> None:
    with BadEngine("status:503") as bad, run_sims(tmp_path, 1, "--task", "score") as (good,):
        r = router(engines=[bad.url, good.url], policy="round_robin")
        for _ in range(4):
            assert httpx.post(f"{r.url}/rerank", json={"model": MODEL, **RERANK}).status_code == 200
        assert bad.posts >= 1
        assert r.metric("kvstack_router_retries_total", model_name=MODEL, reason="503") == bad.posts


def test_the_openapi_schema_lists_every_route(engines: Engines, router: RouterFactory) -> None:
    r = router(engines=engines.urls)
    paths = httpx.get(f"{r.url}/openapi.json").json()["paths"]
    for path in (
        "/v1/responses",
        "/v1/messages",
        "/rerank",
        "/v1/rerank",
        "/v2/rerank",
        "/score",
        "/v1/score",
        "/classify",
        "/pooling",
    ):
        assert "application/json" in paths[path]["post"]["requestBody"]["content"], path
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
        assert "multipart/form-data" in paths[path]["post"]["requestBody"]["content"], path
    ids = [item["post"]["operationId"] for item in paths.values() if "post" in item]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("policy", ["cache_aware", "prefix_trie", "session", "round_robin"])
def test_every_policy_routes_every_route(engines: Engines, router: RouterFactory, policy: str) -> None:
    """Routes without a prompt to key (rerank, score, audio) fall back to load under every policy."""
    r = router(engines=engines.urls, policy=policy)
    client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="x", max_retries=0)
    assert client.responses.create(model="gen", input="hi", max_output_tokens=2).output_text
    assert httpx.post(f"{r.url}/rerank", json={"model": "rank", **RERANK}).status_code == 200
    score = {"model": "rank", "text_1": "a", "text_2": "b"}
    assert httpx.post(f"{r.url}/score", json=score).status_code == 200
    assert client.audio.transcriptions.create(model="asr", file=("a.wav", wav_bytes(0.5), "audio/wav")).text


def test_a_response_goes_where_its_conversation_is_cached(
    event_sims: tuple[list[Sim], Path], router: RouterFactory
) -> None:
    """A chat, then the same conversation continued through /v1/responses: routed to the engine
    that holds its blocks, which finds them cached (the simulator prefills the same tokens)."""
    sims, engines_file = event_sims
    r = router(engines_file=engines_file, policy="cache_aware", expose_engine_header=True, available=2)
    first = [{"role": "system", "content": DOC}, {"role": "user", "content": "What does it keep?"}]
    chat = httpx.post(
        f"{r.url}/v1/chat/completions", json={"model": MODEL, "messages": first, "max_tokens": 4}
    )
    home = chat.headers["x-kvstack-engine"]
    engine = sims[int(home.rsplit("-", 1)[1])]
    wait_until(
        lambda: sample(scrape(r.url), "kvstack_router_kv_index_blocks") >= 30, "the KV events", 10, 0.1
    )
    hits = engine.metric("vllm:prefix_cache_hits_total")
    body = {
        "model": MODEL,
        "instructions": DOC,
        "input": [
            {"role": "user", "content": "What does it keep?"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "blocks"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "Which?"}]},
        ],
        "max_output_tokens": 4,
    }
    resp = httpx.post(f"{r.url}/v1/responses", json=body, timeout=30)
    assert resp.status_code == 200 and resp.headers["x-kvstack-engine"] == home
    assert (
        sample(
            scrape(r.url), "kvstack_router_routing_decisions_total", policy="cache_aware", reason="cache_hit"
        )
        == 1
    )
    assert engine.metric("vllm:prefix_cache_hits_total") - hits >= 30 * 16  # the document's blocks
