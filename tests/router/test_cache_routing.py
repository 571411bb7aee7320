"""The proxy feeding the text and cache-aware policies: prompts, KV events, first-token release,
the policy's counters on /metrics and the optional engine header, against simulator processes."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvstack.common import tokenizer
from kvstack.common.waits import wait_until
from kvstack.router.policies.cache_aware_log import decision_log

from .conftest import MODEL, RouterFactory, Sim, chat_work, run_event_sims

BS = 16
DOC = "The router keeps an index of every block each engine holds. " * 30  # ~40 blocks of tokens


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def event_sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[Sim], Path]]:
    """Two fast simulators publishing KV events, and the engines file that names their endpoints."""
    with run_event_sims(tmp_path_factory.mktemp("event-sims"), block_size=BS) as running:
        yield running


def test_cache_aware_routes_a_growing_chat_to_its_cache_and_exports_its_counters(
    event_sims: tuple[list[Sim], Path], router: RouterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    sims, engines_file = event_sims
    caplog.set_level(logging.DEBUG, logger=decision_log.name)  # why each engine won, for a failure
    # every prompt tokenized whole before routing (no known-prefix routing): exact counts below
    r = router(
        engines_file=engines_file,
        policy="cache_aware",
        expose_engine_header=True,
        available=2,
        tokenize_defer_max_chars=0,
    )
    first = [{"role": "system", "content": DOC}, {"role": "user", "content": "What does it keep?"}]

    def chat(messages: list[dict[str, str]]) -> httpx.Response:
        body = {"model": MODEL, "messages": messages, "max_tokens": 4}
        resp = httpx.post(f"{r.url}/v1/chat/completions", json=body, timeout=30)
        assert resp.status_code == 200, resp.text
        return resp

    home = chat(first).headers["x-kvstack-engine"]
    assert home in ("engine-0", "engine-1")
    blocks = "kvstack_router_kv_index_blocks"  # the engine's events arrived
    wait_until(lambda: sample(scrape(r.url), blocks) >= 30, "KV events in the router's index", 10, 0.1)
    time.sleep(2.5)  # past the speculative TTL: from here on only the engine's events speak
    grown = [*first, {"role": "assistant", "content": "blocks"}, {"role": "user", "content": "Which?"}]
    for messages in (grown, grown, grown):  # the same conversation resent: tokenized once
        sent_to = chat(messages).headers["x-kvstack-engine"]
        decisions = [r.__dict__ for r in caplog.records if r.name == decision_log.name]
        assert sent_to == home, {k: decisions[-1][k] for k in ("chosen", "route_reason", "engines")}
    m = scrape(r.url)
    policy = {"policy": "cache_aware"}
    assert sample(m, "kvstack_router_routing_decisions_total", reason="cache_hit", **policy) >= 3
    assert sample(m, "kvstack_router_kv_event_batches_applied_total") > 0
    assert sample(m, "kvstack_router_kv_index_events_applied_total") > 0
    assert sample(m, "kvstack_router_kv_index_blocks_stored_total") >= 30
    assert sample(m, "kvstack_router_kv_event_batches_malformed_total") == 0
    assert sample(m, "kvstack_router_kv_index_capacity_blocks") > 0
    predicted = sample(m, "kvstack_router_predicted_hit_tokens_total", **policy)
    prompts = sample(m, "kvstack_router_prompt_tokens_total", **policy)
    assert 0 < predicted < prompts
    assert sample(m, "kvstack_router_prompt_token_cache_lookups_total", result="hit") == 2
    assert sample(m, "kvstack_router_prompt_token_cache_lookups_total", result="miss") == 2
    assert sample(m, "kvstack_router_block_key_cache_lookups_total", result="hit") > 0
    # what the router predicted is what the engine found: the three repeats hit the whole first chat
    engine = next(s for s, name in zip(sims, ("engine-0", "engine-1"), strict=True) if name == home)
    engine_hits = engine.metric("vllm:prefix_cache_hits_total")
    assert abs(engine_hits - predicted) <= 3 * BS, (engine_hits, predicted)


def test_a_new_question_routes_on_its_rendered_system_prompt_and_is_rendered_after(
    event_sims: tuple[list[Sim], Path], router: RouterFactory
) -> None:
    _, engines_file = event_sims
    r = router(engines_file=engines_file, policy="cache_aware", expose_engine_header=True, available=2)
    system = {"role": "system", "content": f"{uuid.uuid4()} " + DOC * 2}  # over the 2,048-character limit
    policy = {"policy": "cache_aware"}

    def ask(question: str) -> str:
        body = {"model": MODEL, "messages": [system, {"role": "user", "content": question}], "max_tokens": 4}
        resp = httpx.post(f"{r.url}/v1/chat/completions", json=body, timeout=30)
        assert resp.status_code == 200, resp.text
        return resp.headers["x-kvstack-engine"]

    home = ask("What does it keep?")  # nothing rendered yet: the whole prompt is tokenized first
    wait_until(lambda: sample(scrape(r.url), "kvstack_router_kv_index_blocks") >= 60, "the engine's events")
    time.sleep(2.5)  # past the speculative TTL: only the engine's events speak
    before = sample(scrape(r.url), "kvstack_router_predicted_hit_tokens_total", **policy)
    question = {"role": "user", "content": "Which engine holds it?"}
    assert ask(question["content"]) == home
    m = scrape(r.url)
    assert sample(m, "kvstack_router_routing_decisions_total", reason="cache_hit", **policy) == 1
    # routed on the system prompt's blocks (the new question's own are cached nowhere yet)
    system_tokens = 1 + len(tokenizer.render_message("system", system["content"]))  # and the BOS
    predicted = sample(m, "kvstack_router_predicted_hit_tokens_total", **policy) - before
    assert system_tokens - BS < predicted <= system_tokens
    # the whole prompt was never tokenized before routing ...
    assert chat_work([system, question]).digest not in r.ctx.token_cache
    # ... its question is rendered after the send, so the next turn finds every message cached
    messages = r.ctx.token_cache.messages
    assert messages is not None
    wait_until(lambda: chat_work([system, question]).parts[1] in messages, "the question rendered")


def test_first_token_releases_the_queued_prefill(slow_sims: list[Sim], router: RouterFactory) -> None:
    # A deadline far away: without the first-token hook the ledger would hold the tokens for a minute.
    r = router(
        engines=[s.url for s in slow_sims],
        policy="cache_aware",
        cache_aware={"decision": {"prefill_deadline_floor_s": 60}},
    )
    ledger = r.ctx.policy.ledger  # type: ignore[attr-defined]
    client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0, timeout=30)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": DOC}], max_tokens=200, stream=True
    )
    try:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        busy = [e for e in r.ctx.registry.all() if e.in_flight == 1]
        assert len(busy) == 1  # still streaming
        assert ledger.local(busy[0].url) == 0.0
        assert len(ledger) == 0
    finally:
        stream.close()


def test_prefix_trie_gets_the_prompt_text(sims: list[Sim], router: RouterFactory) -> None:
    r = router(engines=[s.url for s in sims], policy="prefix_trie", expose_engine_header=True)
    plain = router(engines=[s.url for s in sims])
    engines = set()
    for question in ("first?", "second?", "third?"):
        resp = httpx.post(
            f"{r.url}/v1/completions",
            json={"model": MODEL, "prompt": DOC + question, "max_tokens": 1},
            timeout=30,
        )
        assert resp.status_code == 200
        engines.add(resp.headers["x-kvstack-engine"])
    assert len(engines) == 1  # the shared 128-character chunks lead to the same engine
    assert engines <= {s.url for s in sims}  # static discovery names engines by URL
    m = scrape(r.url)
    assert sample(m, "kvstack_router_routing_decisions_total", policy="prefix_trie", reason="prefix") == 2
    assert sample(m, "kvstack_router_routing_decisions_total", policy="prefix_trie", reason="no_match") == 1
    resp = httpx.post(
        f"{plain.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}, timeout=30
    )
    assert resp.status_code == 200 and "x-kvstack-engine" not in resp.headers
    assert "kvstack_router_kv_index_blocks" not in httpx.get(f"{plain.url}/metrics").text
