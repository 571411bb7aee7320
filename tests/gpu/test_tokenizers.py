"""The router's tokenizers against a real simulator, which serves /tokenize as vLLM does."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from tests.conftest import free_port

from kvstack.common import tokenizer as builtin
from kvstack.common.procs import ManagedProcess
from kvstack.router.prompts import PromptCache, PromptWork, prompt_work, work_tokens
from kvstack.router.protocol import Kind, parse_request
from kvstack.router.tokenizers import EngineTokenizer, TokenizeError, parse_tokens, tokenize_body
from kvstack.router.upstream import Timeouts, Upstream

MODEL = "kvstack/sim-8b"
KVSTACK = str(Path(sys.executable).with_name("kvstack"))

CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "hello there"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Count: 1 2 3, then stop.\n\nThanks!"},
        {"role": "assistant", "content": "1 2 3"},
        {"role": "user", "content": "again, ünïcödé ☃"},
    ],
    [{"role": "user", "content": [{"type": "text", "text": "part one "}, {"type": "text", "text": "two"}]}],
]
PROMPTS = ["The quick brown fox", "  spaces\tand\nlines 12345 ", "émoji 🚀 bytes"]


@pytest.fixture(scope="module")
def sim_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [KVSTACK, "engine", "sim", "--port", str(port), "--model", MODEL]
    proc = ManagedProcess("sim", argv, tmp_path_factory.mktemp("sim"), ready_url=f"{url}/health")
    try:
        proc.start().wait_ready(30)
        yield url
    finally:
        proc.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield http


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def work(kind: Kind, **body: Any) -> PromptWork:
    """The router's one selection of the prompt of a request with ``body``."""
    selected = prompt_work(parse_request(kind, msgspec.json.encode({"model": MODEL, **body})))
    assert isinstance(selected, PromptWork)
    return selected


def chat(messages: list[dict[str, Any]]) -> PromptWork:
    return work("chat", messages=messages)


def text(prompt: str) -> PromptWork:
    return work("completion", prompt=prompt)


def builtin_chat(messages: list[dict[str, Any]]) -> list[int]:
    """What the built-in tokenizer (the simulator's) makes of ``messages``."""
    return list(work_tokens(chat(messages), PromptCache()))


@pytest.mark.parametrize("messages", CHATS)
async def test_engine_chat_matches_what_the_engine_prefills(
    sim_url: str, client: httpx.AsyncClient, messages: list[dict[str, Any]]
) -> None:
    tok = EngineTokenizer(client, lambda _m: [sim_url])
    got = await tok.tokens(MODEL, chat(messages))
    assert list(got) == builtin_chat(messages)
    # the simulator prefills exactly these tokens: usage.prompt_tokens agrees
    resp = await client.post(
        f"{sim_url}/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 1}
    )
    assert resp.json()["usage"]["prompt_tokens"] == len(got)
    assert got[0] == builtin.BOS_ID


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_engine_completion_matches_builtin(
    sim_url: str, client: httpx.AsyncClient, prompt: str
) -> None:
    tok = EngineTokenizer(client, lambda _m: [sim_url])
    assert list(await tok.tokens(MODEL, text(prompt))) == builtin.encode(prompt)


async def test_repeat_is_served_from_cache_without_a_round_trip(
    sim_url: str, client: httpx.AsyncClient
) -> None:
    tok = EngineTokenizer(client, lambda _m: [sim_url])
    first = await tok.tokens(MODEL, chat(CHATS[1]))
    assert tok.requests == 1
    again = await tok.tokens(MODEL, chat([dict(m) for m in CHATS[1]]))  # equal content, new objects
    assert again is first and tok.requests == 1 and tok.cache.hits == 1
    await tok.tokens(MODEL, chat(CHATS[1][:-1]))  # a different conversation is a miss
    await tok.tokens(MODEL, text("hello there"))  # same text as a chat elsewhere: its own entry
    assert tok.requests == 3 and len(tok.cache) == 3
    with pytest.raises(TokenizeError, match="another-model"):  # each model has its own tokenizer:
        await tok.tokens("another-model", text("hello there"))  # never answered from MODEL's entry
    assert tok.requests == 4


async def test_falls_over_to_the_next_engine(sim_url: str, client: httpx.AsyncClient) -> None:
    tok = EngineTokenizer(client, lambda _m: [dead_url(), sim_url])
    assert list(await tok.tokens(MODEL, text("abc"))) == builtin.encode("abc")
    assert tok.failures == 1 and tok.requests == 2


async def test_no_engine_raises_naming_the_model(client: httpx.AsyncClient) -> None:
    tok = EngineTokenizer(client, lambda _m: [dead_url(), dead_url()])
    with pytest.raises(TokenizeError, match="sim-8b"):
        await tok.tokens(MODEL, text("abc"))
    with pytest.raises(TokenizeError, match="no engine serves"):
        await EngineTokenizer(client, lambda _m: []).tokens(MODEL, text("abc"))


async def test_engine_error_answer_is_a_failure(sim_url: str, client: httpx.AsyncClient) -> None:
    tok = EngineTokenizer(client, lambda _m: [sim_url])
    with pytest.raises(TokenizeError, match="404"):
        await tok.tokens("no-such-model", text("abc"))
    assert len(tok.cache) == 0


async def test_works_over_the_routers_upstream_client(sim_url: str) -> None:
    for backend in ("aiohttp", "httpx"):
        upstream = Upstream(Timeouts(connect=2, first_byte=10, idle=10), backend=backend)  # type: ignore[arg-type]
        try:
            tok = EngineTokenizer(upstream, lambda _m: [sim_url])
            got = await tok.tokens(MODEL, chat(CHATS[0]))
            assert list(got) == builtin_chat(CHATS[0])
        finally:
            await upstream.aclose()


@pytest.mark.parametrize(
    ("kind", "body", "expected"),
    [
        ("chat", {"messages": CHATS[0]}, "chat"),
        ("completion", {"prompt": "abc def"}, builtin.encode("abc def")),
        ("completion", {"prompt": ["abc", "zzz"]}, builtin.encode("abc")),
        ("embedding", {"input": "abc"}, builtin.encode("abc")),
        ("tokenize", {"messages": CHATS[0]}, "chat"),
    ],
)
async def test_the_engine_tokenizes_the_prompt_the_router_selects(
    sim_url: str, client: httpx.AsyncClient, kind: Kind, body: dict[str, Any], expected: Any
) -> None:
    if expected == "chat":
        expected = builtin_chat(CHATS[0])
    tok = EngineTokenizer(client, lambda _m: [sim_url])
    assert list(await tok.tokens(MODEL, work(kind, **body))) == list(expected)


def test_tokenize_body_renders_what_the_generation_endpoints_do() -> None:
    import json

    chat = json.loads(tokenize_body("m", messages=CHATS[0]))
    assert chat == {
        "model": "m",
        "messages": CHATS[0],
        "add_generation_prompt": True,
        "add_special_tokens": False,
    }
    text = json.loads(tokenize_body("m", prompt="hi"))
    assert text == {"model": "m", "prompt": "hi", "add_special_tokens": True}


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        (b'{"count":2,"max_model_len":8,"tokens":[1,2],"token_strs":null}', True),
        (b'{"tokens":"12"}', False),
        (b'{"tokens":[1,"2"]}', False),
        (b"[1,2]", False),
        (b"{}", False),
        (b'{"tokens":[1,-2]}', False),
        (b'{"tokens":[true]}', False),
    ],
)
def test_parse_tokens(raw: bytes, ok: bool) -> None:
    if ok:
        assert list(parse_tokens(raw)) == [1, 2]
    else:
        with pytest.raises(ValueError):
            parse_tokens(raw)
