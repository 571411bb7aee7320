"""Where a request's prompt tokens come from, for policies that route on them.

The prompt is selected once (:func:`~kvstack.router.prompts.prompt_work`); token ids sent as such
are used as they are. Text and chats go to the built-in tokenizer (its caches, its worker process
for long prompts, and the known prefix of a new chat turn) or the engine's ``/tokenize`` (falling
back to the built-in one when no engine can answer), or the model's own tokenizer files in the
router (``tokenizer: local``, :mod:`.local_tokenizer`; the engine's ``/tokenize`` when they fail).
Each lookup is timed into ``kvstack_router_tokenize_seconds{policy,source}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from kvstack.common.token_cache import TokenCache, Tokens
from kvstack.router.context import RouterContext
from kvstack.router.local_tokenizer import LocalTokenizerError, LocalTokenizers
from kvstack.router.prompts import (
    KnownPrefix,
    PromptWork,
    known_prefix,
    prompt_work,
    render_missing,
    work_tokens,
)
from kvstack.router.protocol import ParsedRequest
from kvstack.router.tokenizer_pieces import ChatPlan
from kvstack.router.tokenizers import EngineTokenizer, TokenizeError

log = logging.getLogger(__name__)


def after_send(fn: Callable[..., object], *args: Any) -> None:
    """Run ``fn(*args)`` once the request about to be sent is on its way.

    Two turns of the event loop: aiohttp writes the request body from a task it creates during the
    send, after anything scheduled before it, so one turn would run ``fn`` ahead of the write.
    """
    loop = asyncio.get_running_loop()
    loop.call_soon(loop.call_soon, fn, *args)


class PromptSource:
    """The prompt tokens of requests for one proxied route."""

    def __init__(self, ctx: RouterContext, engines: Callable[[str | None], list[str]]) -> None:
        self.ctx = ctx
        self._engines = engines  # URLs that may answer /tokenize for a model
        self.engine_tokenizer: EngineTokenizer | None = None  # made on first use
        self.builtin_runs = 0  # prompts the built-in tokenizer answered (the rest: an engine)
        self.local = ctx.local_tokenizers
        self._checks: set[asyncio.Task[None]] = set()  # chats being encoded whole to check their pieces

    async def tokens(self, request: ParsedRequest, policy: str) -> tuple[Sequence[int] | None, int | None]:
        """``(tokens, prompt_len)``: the prompt's tokens, or its known start and estimated length.

        A known start comes with its remaining messages scheduled for rendering after the send.
        """
        t0 = time.perf_counter()
        found, source = await self._tokens(request)
        self._observe(policy, t0, source)
        if isinstance(found, KnownPrefix):
            after_send(render_missing, found, self.ctx.token_cache.messages)
            return found.tokens, found.total
        return found, None

    async def _tokens(self, request: ParsedRequest) -> tuple[Tokens | KnownPrefix | None, str]:
        """Prompt tokens as the engine prefills them, and which tokenizer made them."""
        work = prompt_work(request)
        if not isinstance(work, PromptWork):
            return work, "builtin"  # token ids as sent, or no prompt: nothing to tokenize
        ctx = self.ctx
        model = request.model or ""
        if self.local is not None:
            try:
                return await self._local(self.local, model, work), "local"
            except LocalTokenizerError as err:
                log.warning("local tokenizer failed, asking an engine: %s", err)
        if ctx.settings.tokenizer == "builtin" or ctx.upstream is None:
            return await self._builtin(work), "builtin"
        if self.engine_tokenizer is None:
            cache = TokenCache(ctx.settings.engine_token_cache_bytes)
            self.engine_tokenizer = EngineTokenizer(ctx.upstream, self._engines, cache)
        try:
            return await self.engine_tokenizer.tokens(model, work), "engine"
        except TokenizeError as err:
            log.warning("engine tokenizer failed, using the built-in one: %s", err)
            return await self._builtin(work), "builtin"

    async def _local(self, local: LocalTokenizers, model: str, work: PromptWork) -> Tokens:
        """The model's own tokenizer's tokens. A chat encodes only the pieces the cache lacks (a new
        turn: its new message); a long text to encode goes to a thread that releases the GIL, so
        the event loop keeps relaying streams meanwhile."""
        found = local.cached(model, work)
        if found is not None:
            return found
        tokenizer = local.for_model(model)  # loaded here, on the event loop: never in two threads
        limit = self.ctx.settings.tokenize_offload_min_chars
        plan = local.plan(model, work)
        if plan is None:
            if limit and work.chars >= limit:
                made = await asyncio.to_thread(tokenizer.tokens, work)
                return local.remember(model, work, made)
            return local.remember(model, work, tokenizer.tokens(work))
        if limit and plan.chars_to_encode() >= limit:
            pieces = await asyncio.to_thread(local.encode, model, plan)
        else:
            pieces = local.encode(model, plan)
        joined = local.finish(model, work, plan, pieces)
        if plan.verify:  # after the send, in a thread: the check must not delay the routing
            after_send(self._check, local, model, work, plan, joined)
        return joined

    def _check(
        self, local: LocalTokenizers, model: str, work: PromptWork, plan: ChatPlan, joined: Tokens
    ) -> None:
        async def check() -> None:
            whole = await asyncio.to_thread(local.whole, model, plan)
            local.check(model, work, plan, joined, whole)

        task = asyncio.get_running_loop().create_task(check(), name=f"check pieces of {model}")
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _builtin(self, work: PromptWork) -> Tokens | KnownPrefix:
        """The built-in tokenizer's tokens, or a new chat turn's known prefix."""
        ctx = self.ctx
        cache = ctx.token_cache
        self.builtin_runs += 1
        if ctx.offload is not None:
            await ctx.offload.prefetch(work, cache)  # a long prompt: off the event loop
        limit = ctx.settings.tokenize_defer_max_chars
        if limit and work.chat is not None and work.digest not in cache:
            prefix = known_prefix(work, cache, limit)
            if prefix is not None:
                return prefix
        return work_tokens(work, cache)

    def _observe(self, policy: str, t0: float, source: str) -> None:
        """Time the prompt's tokens took, by the tokenizer that made them."""
        metrics = self.ctx.metrics
        metrics.labelled(metrics.tokenize, policy, source).observe(time.perf_counter() - t0)
