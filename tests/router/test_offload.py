"""Long prompts tokenized in a worker process: same tokens, same shared array, same cache counts."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping

import httpx
import msgspec
import pytest

from kvstack.common import tokenizer
from kvstack.router.offload import TokenizerPool
from kvstack.router.prompts import (
    PromptCache,
    PromptWork,
    prompt_token_ids,
    prompt_work,
    tokenize,
    work_tokens,
)
from kvstack.router.protocol import parse_request

from .conftest import MODEL, RouterFactory, Sim

SHORT = "Hello there."


def long_text() -> str:
    """~5.9K characters no earlier test has tokenized (the message cache is process-wide)."""
    return f"{uuid.uuid4()} " + "Every engine keeps the blocks of the prompts it has seen. " * 100


def chat(text: str) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 2}


def chat_tokens(text: str) -> int:
    return len(tokenizer.apply_chat_template([("user", text)]))


def test_router_tokenizes_long_prompts_in_the_worker(sims: list[Sim], router: RouterFactory) -> None:
    r = router(
        engines=[sims[0].url],
        policy="cache_aware",
        tokenize_offload_min_chars=1000,
        tokenize_defer_max_chars=0,
    )
    assert r.ctx.offload is not None
    long = long_text()
    for text in (long, long, SHORT):
        resp = httpx.post(f"{r.url}/v1/chat/completions", json=chat(text), timeout=30)
        assert resp.status_code == 200, resp.text
    assert r.ctx.offload.offloaded == 1  # the repeat came from the cache, the short one inline
    cache = r.ctx.token_cache
    assert (cache.misses, cache.hits) == (2, 1)
    expected = 2 * chat_tokens(long) + chat_tokens(SHORT)
    assert r.metric("kvstack_router_prompt_tokens_total", policy="cache_aware") == expected


@pytest.mark.parametrize(
    ("settings", "offloads"),
    [
        ({"policy": "cache_aware"}, True),
        ({"policy": "cache_aware", "tokenize_offload_min_chars": 0}, False),
        ({"policy": "cache_aware", "tokenizer": "engine"}, False),
        ({"policy": "least_loaded"}, False),  # needs no tokens
    ],
)
def test_the_worker_runs_only_where_it_can_help(
    sims: list[Sim], router: RouterFactory, settings: dict[str, object], offloads: bool
) -> None:
    r = router(engines=[sims[0].url], **settings)
    assert (r.ctx.offload is not None) is offloads


def test_worker_tokens_are_the_inline_tokens_and_one_shared_array() -> None:
    async def scenario() -> None:
        pool = TokenizerPool(min_chars=1000)
        await pool.start()
        try:
            cache = PromptCache()
            long = long_text()
            for body in (chat(long), {"model": MODEL, "prompt": long}):
                request = parse_request("chat" if "messages" in body else "completion", _json(body))
                await pool.prefetch(prompt_work(request), cache)
                first = prompt_token_ids(request, cache)
                again = prompt_token_ids(request, cache)
                work = prompt_work(request)
                assert isinstance(work, PromptWork)
                assert first == tokenize(work)
                assert again is first
            assert pool.offloaded == 2
            assert (cache.misses, cache.hits) == (2, 2)
            await pool.prefetch(prompt_work(parse_request("chat", _json(chat(SHORT)))), cache)
            assert pool.offloaded == 2  # below the threshold: left to the inline path
            # a new chat whose long message is already known costs no worker round trip
            known = {
                "model": MODEL,
                "messages": [{"role": "user", "content": long}, {"role": "user", "content": SHORT}],
            }
            await pool.prefetch(prompt_work(parse_request("chat", _json(known))), cache)
            assert pool.offloaded == 2
        finally:
            pool.close()

    asyncio.run(scenario())


def _json(body: Mapping[str, object]) -> bytes:
    return msgspec.json.encode(body)


def test_a_chat_sends_only_its_unknown_messages_and_they_are_remembered() -> None:
    async def scenario() -> None:
        pool = TokenizerPool(min_chars=1000)
        await pool.start()
        try:
            system, document = long_text(), long_text()
            msgs = [("system", system), ("user", document)]
            body = {"model": MODEL, "messages": [{"role": r, "content": c} for r, c in msgs]}
            cache = PromptCache()
            work = prompt_work(parse_request("chat", _json(body)))
            assert isinstance(work, PromptWork)
            await pool.prefetch(work, cache)
            assert pool.offloaded == 1
            for digest, (role, content) in zip(work.parts, msgs, strict=True):
                assert digest in cache.messages
                assert list(cache.messages.get(digest, lambda: ())) == list(
                    tokenizer.render_message(role, content)
                )
            # the prompt is then those arrays joined: nothing left to tokenize inline
            made = cache.messages.misses
            assert list(work_tokens(work, cache)) == tokenizer.apply_chat_template(msgs)
            assert cache.messages.misses == made
        finally:
            pool.close()

    asyncio.run(scenario())


def test_a_worker_error_leaves_the_prompt_to_the_inline_path_and_keeps_the_worker() -> None:
    async def scenario() -> None:
        pool = TokenizerPool(min_chars=1000)
        await pool.start()
        try:
            assert await pool._run(int, "not a number") is None  # raised ValueError in the worker
            assert await pool._run(len, "still there") == len("still there")
        finally:
            pool.close()

    asyncio.run(scenario())
