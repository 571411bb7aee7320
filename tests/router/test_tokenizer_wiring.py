"""``tokenizer: engine``: the cache-aware policy gets its prompt tokens from an engine's ``/tokenize``
(cached per prompt), and falls back to the built-in tokenizer when no engine can answer."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

from kvstack.common import tokenizer
from kvstack.common.waits import wait_until
from kvstack.router.proxy import ProxyEndpoint

from .conftest import MODEL, BadEngine, RouterFactory, RouterServer, Sim

CHAT = [{"role": "system", "content": "You are terse. " * 40}, {"role": "user", "content": "Hello?"}]
CHAT_TOKENS = len(tokenizer.apply_chat_template([(m["role"], m["content"]) for m in CHAT]))


def chat_endpoint(r: RouterServer) -> ProxyEndpoint:
    endpoint: Any = r.app.direct["/v1/chat/completions"]
    assert isinstance(endpoint, ProxyEndpoint)
    return endpoint


def post_chat(r: RouterServer) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
    resp = httpx.post(f"{r.url}/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 200, resp.text


def test_engine_tokenizer_feeds_the_policy_the_engines_tokens(sims: list[Sim], router: RouterFactory) -> None:
    r = router(engines=[sims[0].url], policy="cache_aware", tokenizer="engine")
    for _ in range(3):
        post_chat(r)
    engine_tokenizer = chat_endpoint(r).prompts.engine_tokenizer
    assert engine_tokenizer is not None
    assert (engine_tokenizer.requests, engine_tokenizer.failures) == (1, 0)  # asked once, then cached
    assert engine_tokenizer.cache.hits == 2
    assert r.ctx.token_cache.misses + r.ctx.token_cache.hits == 0  # the built-in one never ran
    # the simulator tokenizes like the built-in tokenizer: the policy saw exactly those tokens
    assert r.metric("kvstack_router_prompt_tokens_total", policy="cache_aware") == 3 * CHAT_TOKENS
    assert r.metric("kvstack_router_tokenize_seconds_count", policy="cache_aware", source="engine") == 3


def test_builtin_tokenizer_is_the_default(sims: list[Sim], router: RouterFactory) -> None:
    # the whole prompt tokenized before routing (not a new turn's known prefix): exact counts
    r = router(engines=[sims[0].url], policy="cache_aware", tokenize_defer_max_chars=0)
    post_chat(r)
    assert chat_endpoint(r).prompts.engine_tokenizer is None
    assert chat_endpoint(r).prompts.builtin_runs == 1
    assert r.ctx.token_cache.misses == 1
    assert r.metric("kvstack_router_prompt_tokens_total", policy="cache_aware") == CHAT_TOKENS
    assert r.metric("kvstack_router_tokenize_seconds_count", policy="cache_aware", source="builtin") == 1
    assert r.metric("kvstack_router_dispatch_seconds_count", policy="cache_aware") == 1


def test_failing_engine_tokenize_falls_back_to_the_builtin_tokenizer(router: RouterFactory) -> None:
    with BadEngine("no_tokenize") as engine:
        r = router(engines=[engine.url], policy="cache_aware", tokenizer="engine", tokenize_defer_max_chars=0)
        post_chat(r)
        engine_tokenizer = chat_endpoint(r).prompts.engine_tokenizer
        assert engine_tokenizer is not None
        assert engine_tokenizer.failures == 1
        assert chat_endpoint(r).prompts.builtin_runs == 1
        assert r.ctx.token_cache.misses == 1  # the built-in tokenizer stood in
        assert r.metric("kvstack_router_prompt_tokens_total", policy="cache_aware") == CHAT_TOKENS
        assert r.metric("kvstack_router_tokenize_seconds_count", policy="cache_aware", source="builtin") == 1


def test_access_log_gives_the_routers_share_of_the_ttft(
    sims: list[Sim], router: RouterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    r = router(engines=[sims[0].url], policy="cache_aware", access_log=True)
    with caplog.at_level(logging.INFO, logger="kvstack.router.access"):
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "stream": True}
        with httpx.stream("POST", f"{r.url}/v1/chat/completions", json=body, timeout=30) as resp:
            assert resp.status_code == 200
            resp.read()
    # The access line is written as the handler finishes, which can be just after the client has
    # read the end of the stream.
    lines = wait_until(
        lambda: [rec for rec in caplog.records if rec.name == "kvstack.router.access"], "the access line", 10
    )
    assert len(lines) == 1
    line: Any = lines[0]
    # the router's share (tokens, decision) comes before the engine's prefill in the TTFT
    assert 0 < line.route_ms < line.ttft_ms
