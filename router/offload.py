"""Long uncached prompts are tokenized in one worker process, off the event loop.

The built-in tokenizer is pure Python (~0.19 µs per token): an uncached 8K-token prompt holds the
event loop, and so every stream the router relays, for ~3 ms. A thread would not help (the GIL);
a worker process does. Measured on the dev machine (worst event-loop stall during one prompt,
median of 15, inline vs worker): 2K tokens 0.52 vs 0.45 ms (no gain: the pickling costs as much),
8K tokens 3.2 vs 0.6 ms, 34K tokens 6.3 vs 1.9 ms; the worker adds ~0.5-2 ms to that request's
own latency. Hence a threshold in characters (``tokenize_offload_min_chars``, default ~5K tokens).

The worker's tokens go into the router's :class:`TokenCache` (:meth:`TokenCache.put`), so the
policy still gets one shared tuple per distinct prompt; any failure of the worker falls back to
tokenizing inline.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from kvstack.router.prompts import PromptWork, TokenCache, prompt_work, tokenize
from kvstack.router.protocol import ParsedRequest

log = logging.getLogger(__name__)


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

    async def prefetch(self, request: ParsedRequest, cache: TokenCache) -> None:
        """Tokenize a long, uncached prompt in the worker and leave its tokens in ``cache``."""
        work = prompt_work(request)
        if not isinstance(work, PromptWork) or work.chars < self.min_chars or work.digest in cache:
            return
        pool = self._pool
        if pool is None:
            return
        try:
            tokens = await asyncio.get_running_loop().run_in_executor(pool, tokenize, work)
        except BrokenProcessPool:
            log.warning("the tokenizer worker died; tokenizing inline from now on")
            self._pool = None
            return
        self.offloaded += 1
        cache.put(work.digest, tokens)
