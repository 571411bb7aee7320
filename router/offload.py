"""Long uncached prompts are tokenized in one worker process, off the event loop.

The built-in tokenizer is pure Python (~0.19 µs per token): an uncached 8K-token prompt holds the
event loop, and so every stream the router relays, for ~3 ms. A thread would not help (the GIL);
a worker process does. Measured on the dev machine (worst event-loop stall during one prompt,
median of 15, inline vs worker): 2K tokens 0.52 vs 0.45 ms (no gain: the pickling costs as much),
8K tokens 3.2 vs 0.6 ms, 34K tokens 6.3 vs 1.9 ms; the worker adds ~0.5-2 ms to that request's
own latency. Hence a threshold in characters (``tokenize_offload_min_chars``, default ~5K tokens).

A chat sends the worker only the messages the message cache (:attr:`PromptCache.messages`) lacks,
and their tokens go into that cache, so a long system prompt or document is tokenized once and then
costs every later request a lookup. A text
prompt's tokens go into the router's :class:`PromptCache` (:meth:`TokenCache.put`). Any failure of
the worker falls back to tokenizing inline.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from kvstack.common.token_cache import Tokens
from kvstack.router.prompts import PromptCache, PromptWork, render_message, tokenize

log = logging.getLogger(__name__)
_In = TypeVar("_In")
_Out = TypeVar("_Out")


def _ready() -> bool:
    return True


class TokenizerPool:
    """One worker process that tokenizes prompts of at least ``min_chars`` characters."""

    def __init__(self, min_chars: int) -> None:
        self.min_chars = min_chars
        self.offloaded = 0  # prompts the worker tokenized
        self._pool: ProcessPoolExecutor | None = None

    async def start(self) -> None:
        """Start the worker now, so the first long prompt does not wait for it to boot."""
        # forkserver: forking the router itself would copy its threads' locks mid-use
        context = multiprocessing.get_context("forkserver")
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=context)
        await asyncio.get_running_loop().run_in_executor(self._pool, _ready)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    async def prefetch(self, work: PromptWork | Tokens | None, cache: PromptCache) -> None:
        """Tokenize a long, uncached prompt (:func:`prompt_work`'s answer) in the worker and leave
        its tokens in ``cache``."""
        if not isinstance(work, PromptWork) or work.digest in cache or self._pool is None:
            return
        if work.chat is None:
            if work.chars >= self.min_chars:
                tokens = await self._run(tokenize, work)
                if tokens is not None:
                    cache.put(work.digest, tokens)
            return
        # A chat: only messages the message cache lacks cost anything (a long system prompt or
        # document is tokenized once, then every request reuses it), so only they go.
        messages = cache.messages
        missing = [(d, m) for d, m in zip(work.parts, work.chat, strict=True) if d not in messages]
        if sum(len(c) for _, (_, c) in missing) < self.min_chars:
            return
        rendered = await self._run(render_messages, [m for _, m in missing])
        if rendered is not None:
            for (digest, _), tokens in zip(missing, rendered, strict=True):
                messages.put(digest, tokens)

    async def _run(self, fn: Callable[[_In], _Out], arg: _In) -> _Out | None:
        pool = self._pool
        if pool is None:
            return None
        try:
            out = await asyncio.get_running_loop().run_in_executor(pool, fn, arg)
        except BrokenProcessPool:
            log.warning("the tokenizer worker died; tokenizing inline from now on")
            self._pool = None
            return None
        except Exception:  # e.g. a result that cannot be pickled: this prompt is tokenized inline
            log.warning("the tokenizer worker failed on one prompt; tokenizing it inline", exc_info=True)
            return None
        self.offloaded += 1
        return out


def render_messages(messages: list[tuple[str, str]]) -> list[Tokens]:
    """Each message rendered under the chat template (runs in the worker; arrays pickle compactly)."""
    return [render_message(m) for m in messages]
