"""The HTTP front end of one simulated vLLM 0.24 pod: a plain ASGI app over the engine core.

Plain ASGI rather than FastAPI routes: the streaming path is the simulator's hot loop, and writing SSE
frames straight to ``send`` (templates from :mod:`protocol`) keeps a whole pod's overhead low enough
for hundreds of streamed requests per second on one core. A disconnect watcher reads ``receive`` for
``http.disconnect`` and cancels the handler, which closes the core's stream and so aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from kvstack.common.errors import OpenAIError, error_body
from kvstack.common.tokenizer import decode, encode, token_str
from kvstack.engine.sim import protocol as p
from kvstack.engine.sim.config import SimConfig
from kvstack.engine.sim.events import KVEventPublisher
from kvstack.engine.sim.lora_api import LoRAService
from kvstack.engine.sim.metric_shapes import CacheInfo
from kvstack.engine.sim.metrics import CONTENT_TYPE, SimMetrics
from kvstack.engine.sim.task_routes import GENERATE_ROUTES, task_routes
from kvstack.engine.sim.types import EngineCore, EventSink, RequestOutput, SimRequest, StatsListener

log = logging.getLogger(__name__)
VLLM_VERSION = "0.24.0"
# The ASGI spec's aliases (as asgiref and Starlette type them): any ASGI server or client takes the app.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
EngineFactory = Callable[[SimConfig, StatsListener, EventSink], EngineCore]

_JSON = [(b"content-type", b"application/json")]
_SSE_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")],
}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


async def send_bytes(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, obj: Any) -> None:
    await send_bytes(send, status, _dumps(obj), _JSON)


async def read_body(receive: Receive) -> bytes:
    msg = await receive()
    body: bytes = msg.get("body", b"")
    if not msg.get("more_body"):
        return body
    parts = [body]
    while msg.get("more_body"):
        msg = await receive()
        parts.append(msg.get("body", b""))
    return b"".join(parts)


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


class SimServer:
    """The ASGI app of one simulated pod; call it with (scope, receive, send)."""

    def __init__(
        self,
        config: SimConfig,
        engine_factory: EngineFactory,
        *,
        api_key: str | None = None,
        events: KVEventPublisher | None = None,
        gpu_memory_utilization: float = 0.9,
    ) -> None:
        self.config = config
        self.names = config.served_names
        self.api_key = f"Bearer {api_key}".encode() if api_key else None
        self.events = events
        cache = CacheInfo(
            block_size=config.block_size,
            num_gpu_blocks=config.num_gpu_blocks,
            max_model_len=config.max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.metrics = SimMetrics(self.names[0], cache)
        sink: EventSink = events.publish if events is not None else (lambda _events: None)
        self.engine = engine_factory(config, self.metrics, sink)
        self.metrics.bind_engine(self.engine)
        self.created = int(time.time())
        self._routes: dict[tuple[str, str], Callable[[Scope, Receive, Send], Awaitable[None]]] = {
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/chat/completions"): self._chat_completions,
            ("GET", "/v1/models"): self._models,
            ("POST", "/tokenize"): self._tokenize,
            ("POST", "/detokenize"): self._detokenize,
            ("GET", "/health"): self._health,
            ("GET", "/version"): self._version,
            ("GET", "/metrics"): self._metrics,
            ("POST", "/reset_prefix_cache"): self._reset_prefix_cache,
        }
        # LoRA (engine/sim/lora_api.py): adapters answer as models; the runtime routes need the env switch
        self.lora = LoRAService(config.lora, self.names[0], self.engine)
        if config.lora.enabled:
            self.metrics.enable_lora(config.lora.max_loras)
        if config.lmcache.enabled:
            self.metrics.enable_lmcache(config.model)
        if config.lora.runtime_updating:
            self._routes[("POST", "/v1/load_lora_adapter")] = self._load_lora_adapter
            self._routes[("POST", "/v1/unload_lora_adapter")] = self._unload_lora_adapter
        # --- the routes of the model's tasks (vLLM registers only those; the others are 404)
        if "generate" not in config.tasks:
            for key in GENERATE_ROUTES:
                del self._routes[key]
        self._routes.update(task_routes(self, config.tasks))
        # ---
        self._paths = {path for _, path in self._routes}

    # --- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            handler = self._routes.get((scope["method"], path))
            if handler is None and path.startswith("/v1/responses/") and path.count("/") <= 4:
                # vLLM's /v1/responses/{response_id}[/cancel] (engine/sim/responses.py)
                template = "/v1/responses/{id}/cancel" if path.endswith("/cancel") else "/v1/responses/{id}"
                handler = self._routes.get((scope["method"], template))
            if handler is None:
                status = 405 if path in self._paths else 404
                detail = "Method Not Allowed" if status == 405 else "Not Found"
                return await send_json(send, status, {"detail": detail})
            if self.api_key is not None and path.startswith("/v1") and not self._authorized(scope):
                return await send_json(send, 401, {"error": "Unauthorized"})
            try:
                await handler(scope, receive, send)
            except OpenAIError as err:
                await send_json(send, err.status, err.body())
            except Exception as err:
                log.exception("simulator: %s %s failed", scope["method"], path)
                with contextlib.suppress(RuntimeError):  # raised when the response had started
                    await send_json(send, 500, error_body(500, f"{type(err).__name__}: {err}"))
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                return bool(value == self.api_key)
        return False

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as err:
                    await send({"type": "lifespan.startup.failed", "message": str(err)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def start(self) -> None:
        self.lora.load_static()
        if self.events is not None:
            self.events.start()
        await self.engine.start()

    async def stop(self) -> None:
        await self.engine.stop()
        if self.events is not None:
            self.events.stop()

    # --- small endpoints -------------------------------------------------------------------------

    def _model(self, requested: str | None) -> str:
        if requested is None:
            return self.names[0]
        if requested not in self.names and self.lora.resolve(requested) is None:
            raise OpenAIError(404, f"The model `{requested}` does not exist.", param="model")
        return requested

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = p.models_body(self.names, self.config.model, self.config.max_model_len, self.created)
        body["data"].extend(self.lora.model_cards(self.created))
        await send_json(send, 200, body)

    async def _load_lora_adapter(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_bytes(send, 200, self.lora.load(await read_body(receive)).encode(), [])

    async def _unload_lora_adapter(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_bytes(send, 200, self.lora.unload(await read_body(receive)).encode(), [])

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_bytes(send, 200, b"", [])

    async def _version(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, {"version": VLLM_VERSION})

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_bytes(send, 200, self.metrics.render(), [(b"content-type", CONTENT_TYPE.encode())])

    async def _reset_prefix_cache(self, scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        if not self.engine.reset_prefix_cache():
            raise OpenAIError(500, "Failed to reset prefix cache: requests are still running.")
        await send_bytes(send, 200, b"", [])

    async def _tokenize(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = p.parse(p.TokenizeRequest, await read_body(receive))
        self._model(req.model)
        if req.messages is not None:
            ids = p.chat_prompt_ids(req.messages, req.add_generation_prompt)
        else:
            ids = encode(req.prompt or "")
        strs = [token_str(t) for t in ids] if req.return_token_strs else None
        body = {
            "count": len(ids),
            "max_model_len": self.config.max_model_len,
            "tokens": ids,
            "token_strs": strs,
        }
        await send_json(send, 200, body)

    async def _detokenize(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = p.parse(p.DetokenizeRequest, await read_body(receive))
        self._model(req.model)
        await send_json(send, 200, {"prompt": decode(p.check_token_ids(req.tokens))})

    # --- generation ------------------------------------------------------------------------------

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = p.parse(p.CompletionRequest, await read_body(receive))
        model = self._model(req.model)
        ids, is_text = p.completion_prompt_ids(req.prompt)
        await self._run(scope, receive, send, self._job(req, model, ids, req.max_tokens, is_text, chat=False))

    async def _chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = p.parse(p.ChatCompletionRequest, await read_body(receive))
        model = self._model(req.model)
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
        max_tokens = p.check_length(len(ids), max_tokens, self.config.max_model_len, is_text=is_text)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{os.urandom(16).hex()}"
        adapter = self.lora.resolve(model)
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

        gen = self.engine.generate(job.sim)  # raises OpenAIError before anything is sent
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

    async def _stream(
        self, send: Send, job: _Job, gen: AsyncIterator[RequestOutput], watcher: asyncio.Task[None]
    ) -> None:
        req = job.request
        writer = p.ChunkWriter(
            chat=job.chat, request_id=job.sim.request_id, model=job.model, created=int(time.time())
        )
        stops = req.stop_strings()
        matcher = p.StopMatcher(stops, req.include_stop_str_in_output) if stops else None
        detok = p.Detokenizer()
        await send(_SSE_START)
        if job.chat:
            await send({"type": "http.response.body", "body": writer.role_frame(), "more_body": True})
        completion_tokens = cached = 0
        finish, stop_reason = "abort", None
        try:
            async for out in gen:
                ids = out.new_token_ids
                completion_tokens += len(ids)
                cached = out.num_cached_tokens or cached
                text = detok(ids)
                if matcher is not None:
                    text = matcher.feed(text)
                    if matcher.stop_reason is not None:
                        finish, stop_reason = "stop", matcher.stop_reason
                        self.engine.abort(job.sim.request_id, "stop")  # counted as stop, as vLLM does
                        break
                if out.finished:
                    finish = out.finish_reason or "length"
                    tail = detok.flush()
                    text += matcher.feed(tail) + matcher.flush() if matcher is not None else tail
                    break
                if text:
                    await send(
                        {"type": "http.response.body", "body": writer.text_frame(text), "more_body": True}
                    )
        finally:
            await _close(gen)  # closing early (a disconnect) aborts the request in the core
        frames = [writer.final_frame(text, finish, stop_reason)]
        opts = req.stream_options
        if opts is not None and opts.include_usage:
            usage = p.Usage(len(job.sim.prompt_token_ids), completion_tokens, cached)
            frames.append(writer.usage_frame(usage))
        frames.append(p.DONE_FRAME)
        watcher.cancel()  # the response is ending: its own completion is not a disconnect
        await send({"type": "http.response.body", "body": b"".join(frames), "more_body": False})

    async def _complete(
        self, send: Send, job: _Job, gen: AsyncIterator[RequestOutput], watcher: asyncio.Task[None]
    ) -> None:
        req = job.request
        stops = req.stop_strings()
        matcher = p.StopMatcher(stops, req.include_stop_str_in_output) if stops else None
        detok = p.Detokenizer()
        pieces: list[str] = []
        completion_tokens = cached = 0
        finish, stop_reason = "abort", None
        try:
            async for out in gen:
                ids = out.new_token_ids
                completion_tokens += len(ids)
                cached = out.num_cached_tokens or cached
                text = detok(ids)
                if out.finished:
                    text += detok.flush()
                if matcher is not None:
                    text = matcher.feed(text)
                    if matcher.stop_reason is not None:
                        pieces.append(text)
                        finish, stop_reason = "stop", matcher.stop_reason
                        self.engine.abort(job.sim.request_id, "stop")  # counted as stop, as vLLM does
                        break
                    if out.finished:
                        text += matcher.flush()
                pieces.append(text)
                if out.finished:
                    finish = out.finish_reason or "length"
                    break
        finally:
            await _close(gen)
        usage = p.Usage(len(job.sim.prompt_token_ids), completion_tokens, cached)
        render = p.chat_body if job.chat else p.completion_body
        body = render(
            request_id=job.sim.request_id,
            model=job.model,
            text="".join(pieces),
            finish_reason=finish,
            stop_reason=stop_reason,
            usage=usage,
        )
        watcher.cancel()
        await send_json(send, 200, body)
