"""The HTTP front end of one simulated vLLM 0.24 pod: a plain ASGI app over the engine core.

Plain ASGI rather than FastAPI routes: the streaming path is the simulator's hot loop, and writing SSE
frames straight to ``send`` (templates from :mod:`protocol`) keeps a whole pod's overhead low enough
for hundreds of streamed requests per second on one core. This module is the app: the route table,
auth, errors, lifespan and the small endpoints; completions and chat are in :mod:`.generation`, the
other tasks' routes in :mod:`.task_routes`, the shared ASGI helpers in :mod:`.asgi`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from kvstack.common.errors import OpenAIError, error_body
from kvstack.common.tokenizer import decode, encode, token_str
from kvstack.engine.sim import protocol as p
from kvstack.engine.sim.asgi import Receive, Scope, Send, read_body, send_bytes, send_json
from kvstack.engine.sim.config import SimConfig
from kvstack.engine.sim.events import KVEventPublisher
from kvstack.engine.sim.generation import GenerationRoutes
from kvstack.engine.sim.lora_api import LoRAService
from kvstack.engine.sim.metric_shapes import CacheInfo
from kvstack.engine.sim.metrics import CONTENT_TYPE, SimMetrics
from kvstack.engine.sim.task_routes import GENERATE_ROUTES, task_routes
from kvstack.engine.sim.types import EngineCore, EventSink, StatsListener

log = logging.getLogger(__name__)
VLLM_VERSION = "0.24.0"
EngineFactory = Callable[[SimConfig, StatsListener, EventSink], EngineCore]


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
        generation = GenerationRoutes(self)
        self._routes: dict[tuple[str, str], Callable[[Scope, Receive, Send], Awaitable[None]]] = {
            ("POST", "/v1/completions"): generation.completions,
            ("POST", "/v1/chat/completions"): generation.chat_completions,
            ("GET", "/v1/models"): self._models,
            ("POST", "/tokenize"): self._tokenize,
            ("POST", "/detokenize"): self._detokenize,
            ("GET", "/health"): self._health,
            ("GET", "/version"): self._version,
            ("GET", "/metrics"): self._metrics,
            # vLLM mounts prometheus_client's own app under /metrics too: /metrics/ honours name[]
            ("GET", "/metrics/"): self._metrics_by_name,
            ("POST", "/reset_prefix_cache"): self._reset_prefix_cache,
            # LMCache's internal API (its own port on a real engine: internal_api_server_port_start + 1)
            ("DELETE", "/cache/clear"): self._clear_lmcache,
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

    async def _metrics_by_name(self, scope: Scope, receive: Receive, send: Send) -> None:
        names = parse_qs(scope.get("query_string", b"").decode()).get("name[]")
        await send_bytes(send, 200, self.metrics.render(names), [(b"content-type", CONTENT_TYPE.encode())])

    async def _reset_prefix_cache(self, scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        if not self.engine.reset_prefix_cache():
            raise OpenAIError(500, "Failed to reset prefix cache: requests are still running.")
        await send_bytes(send, 200, b"", [])

    async def _clear_lmcache(self, scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        locations = parse_qs(scope.get("query_string", b"").decode()).get("locations")
        cleared = 0
        if locations is None or "LocalCPUBackend" in locations:
            found = self.engine.clear_lmcache_cpu()
            if found is None:
                raise OpenAIError(404, "LMCache is off on this engine: it has no cache to clear.")
            cleared = found
        await send_json(send, 200, {"status": "success", "num_removed": cleared})

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
