"""Fast in-process checks of the ASGI app over the real SimEngine (httpx.ASGITransport)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from tests.engine_sim_server.conftest import inprocess_sim

from kvstack.common.tokenizer import apply_chat_template
from kvstack.engine.sim.config import SimConfig


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    config = SimConfig(served_model_names=["a", "b"], max_model_len=512, num_gpu_blocks=200, speed=100)
    async with inprocess_sim(config) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path", "status", "body"),
    [
        ("GET", "/nope", 404, {"detail": "Not Found"}),
        ("GET", "/v1/completions", 405, {"detail": "Method Not Allowed"}),
        ("POST", "/health", 405, {"detail": "Method Not Allowed"}),
    ],
)
async def test_routes(http: httpx.AsyncClient, method: str, path: str, status: int, body: object) -> None:
    r = await http.request(method, path)
    assert r.status_code == status
    assert r.json() == body


async def test_every_served_name_answers(http: httpx.AsyncClient) -> None:
    assert [m["id"] for m in (await http.get("/v1/models")).json()["data"]] == ["a", "b"]
    for name in ("a", "b"):
        r = await http.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == name
    r = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})  # model is optional
    assert r.json()["model"] == "a"


async def test_chat_content_forms_render_alike(http: httpx.AsyncClient) -> None:
    msgs = [
        {"role": "system", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
    ]
    tok = (await http.post("/tokenize", json={"messages": msgs})).json()
    assert tok["tokens"] == apply_chat_template([("system", ""), ("user", "one\ntwo")])
    r = await http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 3, "ignore_eos": True})
    assert r.json()["usage"]["prompt_tokens"] == tok["count"]


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 400, "exactly one"),
        ("/tokenize", {"model": "zz", "prompt": "x"}, 404, "`zz` does not exist"),
        ("/detokenize", {"tokens": [-1]}, 400, "out of vocabulary"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "messages",
        ),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "cache_salt": ""}, 400, "cache_salt"),
    ],
)
async def test_rejections(
    http: httpx.AsyncClient, path: str, body: dict[str, object], status: int, needle: str
) -> None:
    r = await http.post(path, json=body)
    assert r.status_code == status
    assert needle in r.json()["error"]["message"]


async def test_reset_prefix_cache_drops_hits(http: httpx.AsyncClient) -> None:
    body = {"prompt": list(range(100, 164)), "max_tokens": 2, "ignore_eos": True}
    await http.post("/v1/completions", json=body)
    hit = (await http.post("/v1/completions", json=body)).json()["usage"]["prompt_tokens_details"][
        "cached_tokens"
    ]
    assert hit >= 48
    assert (await http.post("/reset_prefix_cache")).status_code == 200
    cold = (await http.post("/v1/completions", json=body)).json()["usage"]["prompt_tokens_details"][
        "cached_tokens"
    ]
    assert cold == 0
