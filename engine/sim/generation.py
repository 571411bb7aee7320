"""The simulator's hot path: ``POST /v1/completions`` and ``/v1/chat/completions``, streamed or whole.

A request is parsed and checked into one :class:`_Job`, handed to the engine core, and its outputs
written as they come: SSE frames straight to ``send`` (templates from :mod:`protocol`) when streamed,
one body otherwise. A disconnect watcher reads ``receive`` for ``http.disconnect`` and cancels the
handler, which closes the core's stream and so aborts the request; a stop string ends the request in
the core as "stop", as vLLM's output processor does.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvstack.common.errors import OpenAIError
from kvstack.engine.sim import protocol as p
from kvstack.engine.sim.answer import Answer
from kvstack.engine.sim.asgi import SSE_START, Receive, Scope, Send, read_body, send_json
from kvstack.engine.sim.types import RequestOutput, SimRequest

if TYPE_CHECKING:
    from kvstack.engine.sim.server import SimServer


async def _close(stream: AsyncIterator[RequestOutput]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


@dataclass(slots=True)
class _Job:
    """One accepted generation request."""

    chat: bool
    request: p.CompletionRequest | p.ChatCompletionRequest
    sim: SimRequest
    model: str


class GenerationRoutes:
    """The completions and chat handlers of one simulated pod."""

    def __init__(self, server: SimServer) -> None:
        self.server = server

    async def completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = p.parse(p.CompletionRequest, await read_body(receive))
        model = self.server._model(req.model)
        ids, is_text = p.completion_prompt_ids(req.prompt)
        await self._run(scope, receive, send, self._job(req, model, ids, req.max_tokens, is_text, chat=False))

    async def chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = p.parse(p.ChatCompletionRequest, await read_body(receive))
        model = self.server._model(req.model)
        ids = p.chat_prompt_ids(req.messages, req.add_generation_prompt)
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        await self._run(scope, receive, send, self._job(req, model, ids, limit, True, chat=True))

    def _job(
        self,
        req: p.CompletionRequest | p.ChatCompletionRequest,
        model: str,
        ids: list[int],
        max_tokens: int | None,
        is_text: bool,
        *,
        chat: bool,
    ) -> _Job:
        if req.n != 1:
            raise OpenAIError(400, "n > 1 is not supported by the simulator", param="n")
        max_tokens = p.check_length(len(ids), max_tokens, self.server.config.max_model_len, is_text=is_text)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{os.urandom(16).hex()}"
        adapter = self.server.lora.resolve(model)
        sim = SimRequest(
            request_id=rid,
            prompt_token_ids=ids,
            max_tokens=max_tokens,
            ignore_eos=req.ignore_eos,
            lora_name=adapter.name if adapter is not None else None,
            lora_id=adapter.lora_id if adapter is not None else None,
            cache_salt=req.cache_salt,
            arrival_time=time.monotonic(),
        )
        return _Job(chat=chat, request=req, sim=sim, model=model)

    async def _run(self, scope: Scope, receive: Receive, send: Send, job: _Job) -> None:
        """Serve ``job``; a client disconnect cancels this task, which aborts the request in the core."""
        me = asyncio.current_task()
        assert me is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            me.cancel()

        gen = self.server.engine.generate(job.sim)  # raises OpenAIError before anything is sent
        watcher = asyncio.create_task(watch())
        try:
            if job.request.stream:
                await self._stream(send, job, gen, watcher)
            else:
                await self._complete(send, job, gen, watcher)
        except asyncio.CancelledError:
            if not gone:
                raise
            me.uncancel()
        finally:
            watcher.cancel()

    def _answer(self, job: _Job) -> Answer:
        req = job.request
        return Answer(req.stop_strings(), req.include_stop_str_in_output)

    def _take(self, job: _Job, answer: Answer, out: RequestOutput) -> str:
        """``answer.take(out)``; a stop string that matched ends the request in the core."""
        text = answer.take(out)
        if answer.stop_reason is not None:
            self.server.engine.abort(job.sim.request_id, "stop")  # counted as stop, as vLLM does
        return text

    async def _stream(
        self, send: Send, job: _Job, gen: AsyncIterator[RequestOutput], watcher: asyncio.Task[None]
    ) -> None:
        writer = p.ChunkWriter(
            chat=job.chat, request_id=job.sim.request_id, model=job.model, created=int(time.time())
        )
        answer = self._answer(job)
        await send(SSE_START)
        if job.chat:
            await send({"type": "http.response.body", "body": writer.role_frame(), "more_body": True})
        text = ""
        try:
            async for out in gen:
                text = self._take(job, answer, out)
                if answer.done:
                    break  # the last text goes in the final frame
                if text:
                    await send(
                        {"type": "http.response.body", "body": writer.text_frame(text), "more_body": True}
                    )
        finally:
            await _close(gen)  # closing early (a disconnect) aborts the request in the core
        frames = [writer.final_frame(text, answer.finish, answer.stop_reason)]
        opts = job.request.stream_options
        if opts is not None and opts.include_usage:
            usage = p.Usage(len(job.sim.prompt_token_ids), answer.generated, answer.cached)
            frames.append(writer.usage_frame(usage))
        frames.append(p.DONE_FRAME)
        watcher.cancel()  # the response is ending: its own completion is not a disconnect
        await send({"type": "http.response.body", "body": b"".join(frames), "more_body": False})

    async def _complete(
        self, send: Send, job: _Job, gen: AsyncIterator[RequestOutput], watcher: asyncio.Task[None]
    ) -> None:
        answer = self._answer(job)
        pieces: list[str] = []
        try:
            async for out in gen:
                pieces.append(self._take(job, answer, out))
                if answer.done:
                    break
        finally:
            await _close(gen)
        usage = p.Usage(len(job.sim.prompt_token_ids), answer.generated, answer.cached)
        render = p.chat_body if job.chat else p.completion_body
        body = render(
            request_id=job.sim.request_id,
            model=job.model,
            text="".join(pieces),
            finish_reason=answer.finish,
            stop_reason=answer.stop_reason,
            usage=usage,
        )
        watcher.cancel()
        await send_json(send, 200, body)
