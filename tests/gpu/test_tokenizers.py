"""The router's tokenizers against a real simulator, which serves /tokenize as vLLM does."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import free_port

from kvstack.common import tokenizer as builtin
from kvstack.common.procs import ManagedProcess
from kvstack.router.protocol import parse_request
from kvstack.router.tokenizers import (
    LRU,
    BuiltinTokenizer,
    EngineTokenizer,
    TokenizeError,
    input_digest,
    parse_tokens,
    request_tokens,
    tokenize_body,
)
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


@pytest.mark.parametrize("messages", CHATS)
async def test_engine_chat_matches_what_the_engine_prefills(
    sim_url: str, client: httpx.AsyncClient, messages: list[dict[str, Any]]
) -> None:
    tok = EngineTokenizer(client, lambda _m: [sim_url])
    got = await tok.chat(MODEL, messages)
    assert list(got) == list(await BuiltinTokenizer().chat(MODEL, messages))
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
    assert list(await tok.completion(MODEL, prompt)) == builtin.encode(prompt)


async def test_repeat_is_served_from_cache_without_a_round_trip(
    sim_url: str, client: httpx.AsyncClient
) -> None:
    tok = EngineTokenizer(client, lambda _m: [sim_url])
    first = await tok.chat(MODEL, CHATS[1])
    assert tok.requests == 1
    again = await tok.chat(MODEL, [dict(m) for m in CHATS[1]])  # equal content, new objects
    assert again is first and tok.requests == 1 and tok.cache.hits == 1
    await tok.chat(MODEL, CHATS[1][:-1])  # a different conversation is a miss
    await tok.completion(MODEL, "hello there")  # same text as a chat elsewhere: its own entry
    assert tok.requests == 3 and len(tok.cache) == 3


async def test_falls_over_to_the_next_engine(sim_url: str, client: httpx.AsyncClient) -> None:
    tok = EngineTokenizer(client, lambda _m: [dead_url(), sim_url])
    assert list(await tok.completion(MODEL, "abc")) == builtin.encode("abc")
    assert tok.failures == 1 and tok.requests == 2


async def test_no_engine_raises_naming_the_model(client: httpx.AsyncClient) -> None:
    tok = EngineTokenizer(client, lambda _m: [dead_url(), dead_url()])
    with pytest.raises(TokenizeError, match="sim-8b"):
        await tok.completion(MODEL, "abc")
    with pytest.raises(TokenizeError, match="no engine serves"):
        await EngineTokenizer(client, lambda _m: []).completion(MODEL, "abc")


async def test_engine_error_answer_is_a_failure(sim_url: str, client: httpx.AsyncClient) -> None:
    tok = EngineTokenizer(client, lambda _m: [sim_url])
    with pytest.raises(TokenizeError, match="404"):
        await tok.completion("no-such-model", "abc")
    assert len(tok.cache) == 0


async def test_works_over_the_routers_upstream_client(sim_url: str) -> None:
    for backend in ("aiohttp", "httpx"):
        upstream = Upstream(Timeouts(connect=2, first_byte=10, idle=10), backend=backend)  # type: ignore[arg-type]
        try:
            tok = EngineTokenizer(upstream, lambda _m: [sim_url])
            got = await tok.chat(MODEL, CHATS[0])
            assert list(got) == list(await BuiltinTokenizer().chat(MODEL, CHATS[0]))
        finally:
            await upstream.aclose()


@pytest.mark.parametrize(
    ("kind", "body", "expected"),
    [
        ("chat", {"model": MODEL, "messages": CHATS[0]}, "chat"),
        ("completion", {"model": MODEL, "prompt": "abc def"}, builtin.encode("abc def")),
        ("completion", {"model": MODEL, "prompt": ["abc", "zzz"]}, builtin.encode("abc")),
        ("completion", {"model": MODEL, "prompt": [5, 6, 7]}, [5, 6, 7]),
        ("embedding", {"model": MODEL, "input": "abc"}, builtin.encode("abc")),
        ("tokenize", {"model": MODEL, "messages": CHATS[0]}, "chat"),
    ],
)
async def test_request_tokens(
    sim_url: str, client: httpx.AsyncClient, kind: Any, body: dict[str, Any], expected: Any
) -> None:
    import msgspec

    request = parse_request(kind, msgspec.json.encode(body))
    if expected == "chat":
        expected = await BuiltinTokenizer().chat(MODEL, CHATS[0])
    for tok in (BuiltinTokenizer(), EngineTokenizer(client, lambda _m: [sim_url])):
        got = await request_tokens(tok, request)
        assert got is not None and list(got) == list(expected)


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
    ],
)
def test_parse_tokens(raw: bytes, ok: bool) -> None:
    if ok:
        assert parse_tokens(raw) == (1, 2)
    else:
        with pytest.raises(ValueError):
            parse_tokens(raw)


def test_digest_separates_kind_model_and_content() -> None:
    base = input_digest("chat", "m", [{"role": "user", "content": "a"}])
    assert base == input_digest("chat", "m", [{"role": "user", "content": "a"}])
    assert base != input_digest("completion", "m", [{"role": "user", "content": "a"}])
    assert base != input_digest("chat", "m2", [{"role": "user", "content": "a"}])
    assert base != input_digest("chat", "m", [{"role": "user", "content": "b"}])


@pytest.mark.parametrize(
    ("max_entries", "max_tokens", "sizes", "kept"),
    [
        (2, 100, [1, 1, 1], [1, 2]),  # entry bound: the oldest goes
        (10, 5, [3, 3], [1]),  # token bound
        (10, 5, [6], []),  # larger than the whole budget: not kept
        (10, 100, [1, 2, 3], [0, 1, 2]),
    ],
)
def test_lru_bounds(max_entries: int, max_tokens: int, sizes: list[int], kept: list[int]) -> None:
    lru = LRU(max_entries, max_tokens)
    for i, n in enumerate(sizes):
        lru.put(i, tuple(range(n)))
    assert [i for i in range(len(sizes)) if lru.get(i) is not None] == kept
    assert lru.tokens == sum(sizes[i] for i in kept) <= max_tokens


def test_lru_refreshes_on_get() -> None:
    lru = LRU(2, 100)
    lru.put(1, (1,))
    lru.put(2, (2,))
    assert lru.get(1) == (1,)
    lru.put(3, (3,))
    assert lru.get(2) is None and lru.get(1) == (1,)
    with pytest.raises(ValueError):
        LRU(0, 1)
