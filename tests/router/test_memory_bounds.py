"""Every cache the router keys by request content stays within its byte budget, measured for real.

Each test fills a cache well past its budget with real-size prompts (3-5K-token chats whose
histories grow, many users: the soak's chat workload) and checks two things: the cache's own count
never exceeds the budget, and the memory the cache really holds (tracemalloc: every allocation made
while filling that is still alive once the prompts themselves are gone) is within it too, so the
count is honest.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
from pydantic import ValidationError

from kvstack.bench.soak_chats import ChatWorkload, chat_messages
from kvstack.common.blocks import chain_root
from kvstack.common.token_cache import TokenCache
from kvstack.router.config import RouterSettings
from kvstack.router.engines import Endpoint, EngineRegistry, EngineState
from kvstack.router.exchange import Exchange, account
from kvstack.router.kvindex.index import KVIndex
from kvstack.router.kvindex.keys import KeyCache
from kvstack.router.metrics import OTHER_MODEL, RouterMetrics
from kvstack.router.policies.base import RequestFeatures
from kvstack.router.policies.cache_aware import CacheAwareConfig, CacheAwarePolicy
from kvstack.router.policies.cache_aware_settings import CacheAwareSettings
from kvstack.router.prompts import PromptCache, PromptWork, chat_tokens, digest, digest_of_digests

WORKLOAD = ChatWorkload(users=40)
MB = 1 << 20


def real_chats(n: int) -> Iterator[PromptWork]:
    """The first ``n`` requests of the soak's chat workload, as the router selects their prompts."""
    for i in range(n):
        msgs = chat_messages(i, WORKLOAD)
        chat = [(m["role"], m["content"]) for m in msgs]
        parts = tuple(digest(b"m", pair) for pair in chat)
        yield PromptWork(
            digest_of_digests(b"c", parts), sum(len(c) for _, c in chat), chat, None, parts, msgs
        )


def held_bytes(fill: Callable[[], object]) -> tuple[object, int]:
    """What ``fill()`` returns, and the bytes still allocated once it has returned (its result)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        made = fill()
        gc.collect()
        return made, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_prompt_cache_holds_what_it_counts_for_real_size_chats() -> None:
    budget = 2 * MB  # whole prompts; the message cache gets twice that
    works = list(real_chats(400))  # made before measuring: only what the cache keeps is counted

    def fill() -> PromptCache:
        cache = PromptCache(budget)
        for work in works:  # ~1.6M tokens: 6.4 MB of prompts, 3x the budget
            tokens = cache.get(work.digest, lambda w=work: chat_tokens(w, cache.messages))
            assert 2900 < len(tokens) < 5000  # real size
            assert cache.bytes <= cache.max_bytes and cache.messages.bytes <= cache.messages.max_bytes
        return cache

    cache, held = held_bytes(fill)
    assert isinstance(cache, PromptCache)
    assert len(cache) < 400  # it did evict
    counted = cache.bytes + cache.messages.bytes
    # the count covers what is really held (the dicts' tables, a few hundred bytes each, are not
    # counted per entry: 2 % for them); and it is no more than a tenth above it
    assert held <= counted * 1.02 + 64 * 1024
    assert counted <= held * 1.1
    assert counted <= 3 * budget


def test_key_cache_holds_what_it_counts_for_real_size_chats() -> None:
    budget = 2 * MB
    root = chain_root("m")
    works = list(real_chats(400))

    def fill() -> KeyCache:
        keys, tokens_of = KeyCache(max_bytes=budget), PromptCache(64 * MB)
        for work in works:
            # the router hands the key cache the token cache's array: a repeat is an identity hit
            tokens = tokens_of.get(work.digest, lambda w=work: chat_tokens(w, tokens_of.messages))
            keys.keys(tokens, 16, root)
            assert keys.bytes <= keys.max_bytes
        tokens_of.__init__(64 * MB)  # type: ignore[misc]  # drop the token cache: keys alone stay
        return keys

    keys, held = held_bytes(fill)
    assert isinstance(keys, KeyCache)
    assert 0 < keys.identity_entries() < 400 and len(keys) > 0  # both halves evicted, both hold some
    # the count errs high (shared key ints counted per tuple), never low
    assert held <= keys.max_bytes + 64 * 1024
    assert keys.bytes >= held * 0.5


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: RouterSettings(token_cache_bytes=1000), "token_cache_bytes"),
        (lambda: RouterSettings(engine_token_cache_bytes=0), "engine_token_cache_bytes"),
        (lambda: CacheAwareConfig(key_cache_bytes=10), "key_cache_bytes"),
        (lambda: CacheAwareSettings(max_session_bytes=-1), "max_session_bytes"),
    ],
)
def test_a_budget_too_small_is_refused_naming_its_field(make: Callable[[], object], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        make()


def test_engine_tokenizer_cache_is_bounded_by_its_own_budget() -> None:
    cache = TokenCache(MB)
    for work in real_chats(200):
        cache.put(work.digest, chat_tokens(work, None))
        assert cache.bytes <= MB
    assert 0 < len(cache) < 200


def test_session_map_is_bounded_by_the_bytes_of_client_chosen_keys() -> None:
    index = KVIndex()
    cands = []
    for i in range(2):
        ep = Endpoint(url=f"http://e{i}", name=f"e{i}", models=frozenset({"m"}))
        cands.append(EngineState(endpoint=ep, models=ep.models, block_size=16, num_gpu_blocks=1000))
        index.ensure_engine(ep.url, model="m", block_size=16)
    settings = CacheAwareSettings(seed=0, max_session_bytes=MB)
    now = [0.0]  # time passes: the prefill ledger's deadlines expire as they would
    policy = CacheAwarePolicy(index, settings, clock=lambda: now[0])

    def fill() -> None:
        for i in range(1000):  # 8 KB keys (a header's worth): 8 MB sent, 8x the budget
            request = RequestFeatures(model="m", request_id=f"r{i}",
                                      session_key=f"{i:08d}" + "s" * 8184)  # fmt: skip
            now[0] += 10.0
            decision = policy.choose(request, cands, now[0])
            policy.on_dispatch(request, decision)
            policy.on_finish(request, decision, True)
            assert policy.session_bytes <= settings.max_session_bytes

    _, held = held_bytes(fill)
    assert 100 < len(policy._sessions) < 1000  # evicted by bytes, long before max_sessions
    assert held <= settings.max_session_bytes + 64 * 1024  # the count is honest
    assert policy.session_bytes >= held * 0.9


def test_models_nobody_serves_share_one_label_set() -> None:
    metrics = RouterMetrics(EngineRegistry(), time.monotonic, configured_models=["m"])
    for i in range(500):  # random model names a client made up: each answered 404 by the router
        account(
            metrics, Exchange(f"r{i}", time.perf_counter(), model=f"made-up-{i}", status=404), "/x", False
        )
    account(
        metrics, Exchange("s", time.perf_counter(), model="m", engine="http://e0", status=200), "/x", False
    )
    account(
        metrics, Exchange("t", time.perf_counter(), model="m", engine="http://e0", status=404), "/x", False
    )
    sets = {
        (s.labels["model_name"], s.labels["status"])
        for family in metrics.registry.collect()
        if family.name == "kvstack_router_requests"
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert sets == {(OTHER_MODEL, "404"), ("m", "200"), ("m", "404")}  # a served model keeps its label
