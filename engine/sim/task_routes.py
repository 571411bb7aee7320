"""Which routes a simulated model answers, by its tasks, and what their handlers share.

vLLM 0.24 registers only the routes of its model's supported tasks (``build_app``: the generate
routers when "generate" is supported, speech-to-text for "transcription", the pooling routers for
the pooling tasks), so a route of another task is FastAPI's plain ``404 {"detail": "Not Found"}``;
the simulator answers the same (its unknown-route answer). The handlers live by family:
:mod:`.responses`, :mod:`.messages`, :mod:`.pooling`, :mod:`.audio`. Each request goes through the
engine core like vLLM's (a pooling request is a one-step prefill), so these routes load the engine,
show in its metrics and are aborted when the client goes away.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any

from kvstack.engine.sim.config import Task
from kvstack.engine.sim.types import RequestOutput, SimRequest

if TYPE_CHECKING:
    from kvstack.engine.sim.asgi import Receive, Scope, Send
    from kvstack.engine.sim.server import SimServer

Handler = Callable[["Scope", "Receive", "Send"], Awaitable[None]]
Routes = dict[tuple[str, str], Handler]

# the generate task's routes the server itself serves (completions and chat: its hot path)
GENERATE_ROUTES = (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"))
# every route of each task beyond those, as vLLM 0.24 mounts them
TASK_PATHS: dict[Task, tuple[str, ...]] = {
    "generate": ("/v1/responses", "/v1/messages"),
    "transcription": ("/v1/audio/transcriptions", "/v1/audio/translations"),
    "embed": ("/v1/embeddings", "/pooling"),
    "classify": ("/classify", "/pooling"),
    "score": ("/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank"),
}


def task_routes(server: SimServer, tasks: Collection[Task]) -> Routes:
    """The routes of ``tasks`` beyond completions and chat, bound to ``server``."""
    from kvstack.engine.sim.audio import AudioRoutes
    from kvstack.engine.sim.messages import MessagesRoutes
    from kvstack.engine.sim.pooling import PoolingRoutes
    from kvstack.engine.sim.responses import ResponsesRoutes

    handlers: dict[str, Handler] = {}
    responses, pooling, audio = ResponsesRoutes(server), PoolingRoutes(server), AudioRoutes(server)
    handlers["/v1/responses"] = responses.create
    handlers["/v1/messages"] = MessagesRoutes(server).create
    handlers["/v1/audio/transcriptions"] = audio.transcribe
    handlers["/v1/audio/translations"] = audio.translate
    handlers["/v1/embeddings"] = pooling.embeddings
    handlers["/pooling"] = pooling.pooling
    handlers["/classify"] = pooling.classify
    for path in ("/score", "/v1/score"):
        handlers[path] = pooling.score
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        handlers[path] = pooling.rerank
    routes: Routes = {("POST", path): handlers[path] for task in tasks for path in TASK_PATHS[task]}
    if "generate" in tasks:  # stored responses (the server matches these templates by prefix)
        routes[("GET", "/v1/responses/{id}")] = responses.retrieve
        routes[("POST", "/v1/responses/{id}/cancel")] = responses.cancel
    return routes


def request_id(prefix: str) -> str:
    return f"{prefix}{os.urandom(16).hex()}"


class Guard:
    """Runs a handler's work so that the client going away cancels it (closing the engine streams
    aborts their requests); :meth:`finishing` is called right before the last send, whose own
    completion is not a disconnect."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._watcher: asyncio.Task[None] | None = None

    async def run(self, work: Callable[[], Awaitable[None]]) -> None:
        me = asyncio.current_task()
        assert me is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await self._receive())["type"] != "http.disconnect":
                pass
            gone = True
            me.cancel()

        self._watcher = asyncio.create_task(watch())
        try:
            await work()
        except asyncio.CancelledError:
            if not gone:
                raise
            me.uncancel()
        finally:
            self._watcher.cancel()

    def finishing(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()


async def outputs(server: SimServer, sim: SimRequest) -> AsyncIterator[RequestOutput]:
    """The engine's outputs for ``sim``; leaving early aborts the request in the core."""
    gen = server.engine.generate(sim)  # raises OpenAIError before anything is sent
    try:
        async for out in gen:
            yield out
            if out.finished:
                return
    finally:
        close = getattr(gen, "aclose", None)
        if close is not None:
            await close()


async def prefill(server: SimServer, ids: list[int], rid: str) -> int:
    """Run ``ids`` through the core as a pooling model does (one step: the prefill); the prompt
    tokens it found cached."""
    sim = SimRequest(request_id=rid, prompt_token_ids=ids, max_tokens=1, ignore_eos=True)
    cached = 0
    async for out in outputs(server, sim):
        cached = out.num_cached_tokens or cached
    return cached


def usage_info(prompt_tokens: int) -> dict[str, Any]:
    """vLLM's ``UsageInfo`` of a request that generated nothing."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
    }
