"""The router's ASGI app: proxied OpenAI routes, the model list, health, readiness and metrics.

``create_app(settings)`` wires discovery (static or Kubernetes), the engine monitor, the policy and
the shared upstream client; they start and stop with the app's lifespan. Proxied routes are plain
ASGI endpoints (see :mod:`kvstack.router.proxy`); FastAPI serves only the small admin surface and
``/openapi.json``, which describes both (see :mod:`kvstack.router.openapi`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from kvstack.common.config import ConfigError
from kvstack.common.errors import OpenAIError, error_body
from kvstack.common.lora import LoraClient
from kvstack.router.adapters import AdapterLoader
from kvstack.router.auth import KeyStore, read_keys_file
from kvstack.router.config import RouterSettings
from kvstack.router.context import REQUEST_ID_KEY, RouterContext
from kvstack.router.discovery import KubernetesDiscovery, StaticDiscovery
from kvstack.router.engines import Endpoint, EngineRegistry
from kvstack.router.fetch import EngineFetch
from kvstack.router.hold import Holds
from kvstack.router.limits import BodyBudget, KeyLimiter
from kvstack.router.metrics import CONTENT_TYPE, RouterMetrics
from kvstack.router.monitor import EngineMonitor
from kvstack.router.offload import TokenizerPool
from kvstack.router.openapi import METRICS_RESPONSES, READY_RESPONSES, error_responses, install
from kvstack.router.policies import make_policy
from kvstack.router.policies.base import Policy
from kvstack.router.policy_metrics import PolicyCollector
from kvstack.router.prompts import PromptCache
from kvstack.router.protocol import Kind
from kvstack.router.proxy import ProxyEndpoint
from kvstack.router.readiness import readiness
from kvstack.router.response_routes import STORED_ROUTES, StoredResponseEndpoint, stored_operations
from kvstack.router.sticky import ResponseOwners
from kvstack.router.upstream import Timeouts, Upstream

log = logging.getLogger(__name__)

PROXIED: tuple[tuple[str, Kind], ...] = (
    ("/v1/chat/completions", "chat"),
    ("/v1/completions", "completion"),
    ("/v1/embeddings", "embedding"),
    ("/tokenize", "tokenize"),
    ("/detokenize", "detokenize"),
    # the other routes vLLM 0.24 serves (a model answers those of its tasks; the others are 404)
    ("/v1/responses", "responses"),
    ("/v1/messages", "messages"),  # Anthropic's Messages API, which vLLM serves too
    ("/rerank", "rerank"),
    ("/v1/rerank", "rerank"),
    ("/v2/rerank", "rerank"),
    ("/score", "score"),
    ("/v1/score", "score"),
    ("/classify", "classify"),
    ("/pooling", "pooling"),
    ("/v1/audio/transcriptions", "audio"),
    ("/v1/audio/translations", "audio"),
)
_MAX_REQUEST_ID = 128

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class _Lifecycle(Protocol):
    async def stop(self) -> None: ...


class RequestIdMiddleware:
    """Accept ``X-Request-Id`` (or make one), keep it in the scope, and return it on the response.

    POSTs to the proxied routes go straight to their endpoint: they handle every error themselves,
    and FastAPI's middleware stack (telemetry, body limit, exception layers) cost about 5% of the
    router's CPU per request for nothing (py-spy, ``kvstack bench router``).
    """

    def __init__(
        self, app: ASGIApp, direct: dict[str, ASGIApp] | None = None, metrics_port: int | None = None
    ) -> None:
        self.app = app
        self.direct = direct or {}
        self.metrics_port = metrics_port

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.metrics_port is not None and _on_metrics_port(scope, self.metrics_port) != (
            scope["path"] == "/metrics"
        ):
            # /metrics only on its own port (which the Ingress does not expose), nothing else there
            await _send_error(send, OpenAIError(404, "not found on this port"))
            return
        rid = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                # only a sane id is echoed into logs and upstream headers
                if 0 < len(value) <= _MAX_REQUEST_ID and value.isascii() and value.decode().isprintable():
                    rid = value.decode()
                break
        if not rid:
            rid = uuid.uuid4().hex
        scope[REQUEST_ID_KEY] = rid
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        endpoint = self.direct.get(scope["path"]) if scope["method"] == "POST" else None
        if endpoint is None:
            await self.app(scope, receive, send_with_id)
            return
        try:
            await endpoint(scope, receive, send_with_id)
        except Exception:
            # a bug, not the client's doing: log it, and answer in the OpenAI shape (uvicorn's own
            # 500 is plain text); counted as 500 by the endpoint's accounting. When the response
            # had started, the server refuses a second start (RuntimeError) and drops the connection.
            log.exception("unhandled error in %s", scope["path"], extra={"request_id": rid})
            with contextlib.suppress(RuntimeError):
                await _send_error(send_with_id, OpenAIError(500, "internal error in the router"))


def _on_metrics_port(scope: dict[str, Any], metrics_port: int) -> bool:
    server = scope.get("server")
    return server is not None and server[1] == metrics_port


async def _send_error(send: Any, err: OpenAIError) -> None:
    response = _error(err.status, err.message, err.param)
    await send(
        {"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers}
    )
    await send({"type": "http.response.body", "body": response.body})


def _static_endpoints(settings: RouterSettings) -> list[str | Endpoint]:
    if not settings.models:
        return list(settings.engines)  # models are learned from each engine's /v1/models
    models = frozenset(settings.models)
    return [Endpoint(url=url, name=url, models=models) for url in settings.engines]


def build_context(settings: RouterSettings, registry: EngineRegistry | None = None) -> RouterContext:
    """Everything but the I/O: fails at start (ConfigError) on a bad policy or key file."""
    registry = registry if registry is not None else EngineRegistry()
    try:
        policy: Policy = make_policy(settings.policy, registry=registry, settings=settings)
    except ValueError as err:
        raise ConfigError(f"invalid router configuration: policy: {err}") from err
    pairs: list[tuple[str | None, str]] = [(None, k.get_secret_value()) for k in settings.api_keys]
    if settings.api_keys_file is not None:
        pairs.extend(read_keys_file(settings.api_keys_file))
    clock = time.monotonic
    adapters = [a.name for a in settings.adapters]  # declared LoRA adapters: held and labelled as models
    metrics = RouterMetrics(registry, clock, [*settings.models, *settings.hold_models, *adapters])
    token_cache = PromptCache(settings.token_cache_bytes)
    metrics.registry.register(PolicyCollector(policy, token_cache))
    return RouterContext(
        settings=settings,
        registry=registry,
        policy=policy,
        metrics=metrics,
        token_cache=token_cache,
        keys=KeyStore(pairs),
        limiter=KeyLimiter(
            rate=settings.rate_limit_rps,
            burst=settings.rate_limit_burst,
            max_concurrency=settings.max_concurrency_per_key,
        ),
        clock=clock,
        holds=Holds([*settings.hold_models, *adapters], settings.max_held_per_model),
        bodies=BodyBudget(settings.max_buffered_body_bytes),
        owners=ResponseOwners(settings.sticky_responses),
    )


@asynccontextmanager
async def _running(ctx: RouterContext) -> AsyncIterator[None]:
    """Open the upstream client, start discovery, the monitor and the policy; stop them all after."""
    settings = ctx.settings
    ctx.upstream = Upstream(
        Timeouts(settings.connect_timeout_s, settings.first_byte_timeout_s, settings.idle_timeout_s),
        backend=settings.upstream_backend,
        max_connections=settings.max_connections,
        keepalive_expiry=settings.keepalive_expiry_s,
        max_response_bytes=settings.max_response_bytes,
    )
    monitor_config = settings.monitor
    if monitor_config.api_key is None and settings.engine_api_key is not None:
        monitor_config = monitor_config.model_copy(update={"api_key": settings.engine_api_key})
    if settings.adapters and not monitor_config.learn_adapters:  # LoRA: adapters of named engines too
        monitor_config = monitor_config.model_copy(update={"learn_adapters": True})
    monitor_client = EngineFetch()  # its own pool: proxied streams never starve the probes
    stops: list[_Lifecycle] = []
    try:
        if settings.discovery == "kubernetes":
            kube = KubernetesDiscovery(ctx.registry, settings.kubernetes)
            kube.start()
            stops.append(kube)
        elif settings.engines or settings.engines_file is not None:
            static = StaticDiscovery(
                ctx.registry, urls=_static_endpoints(settings), file=settings.engines_file
            )
            await static.start()
            stops.append(static)
        monitor = EngineMonitor(ctx.registry, monitor_client, monitor_config, clock=ctx.clock)
        monitor.start()
        stops.append(monitor)
        # serve only once the engines' first probe (health, then models) is in: one probe each, bounded
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2 * monitor_config.probe_timeout + 0.5):
                await monitor.settled()
        ctx.warm_tokenizers()  # before the port is served: no first request loads a tokenizer
        ctx.refresh_models = monitor.refresh_models  # an engine that lost a model (router/model_gone.py)
        if settings.adapters and settings.load_adapters:  # LoRA: load a held request's adapter
            key = settings.engine_api_key.get_secret_value() if settings.engine_api_key else None
            loader = AdapterLoader(
                settings.adapters,
                ctx.registry,
                LoraClient(api_key=key),
                monitor.refresh_models,
                fail=ctx.fail_held,
                clock=ctx.clock,
                max_wait_s=settings.hold_timeout_s,
            )
            ctx.holds.on_wait.append(loader.on_hold)
            ctx.registry.loadable = frozenset(a.name for a in settings.adapters)
            stops.append(loader)
        if (
            ctx.policy.needs_tokens
            and settings.tokenizer == "builtin"
            and settings.tokenize_offload_min_chars
        ):
            ctx.offload = TokenizerPool(settings.tokenize_offload_min_chars)
            await ctx.offload.start()
        await ctx.policy.start()
        stops.append(ctx.policy)
        if settings.tracing.enabled:
            from kvstack.router.tracing import RouterTracing  # the SDK is loaded only when tracing is on

            ctx.tracing = RouterTracing(settings.tracing)
        yield
    finally:
        for component in reversed(stops):
            with contextlib.suppress(Exception):
                await component.stop()
        await ctx.flow.stop()
        await monitor_client.aclose()
        await ctx.upstream.aclose()
        if ctx.offload is not None:
            ctx.offload.close()
            ctx.offload = None
        if ctx.tracing is not None:
            # exports the spans still queued; in a thread, as a collector that is down makes it retry
            await asyncio.to_thread(ctx.tracing.shutdown)
            ctx.tracing = None


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    # every 429/503 says when to come back (the proxied routes' own carry their computed wait)
    headers = {"retry-after": "1"} if status in (429, 503) else None
    return JSONResponse(error_body(status, message, param=param), status_code=status, headers=headers)


def _models_payload(ctx: RouterContext) -> dict[str, Any]:
    created = int(time.time())
    # held models too: a client discovers a model scaled to zero, and its request wakes it
    models = sorted(ctx.registry.models(ctx.clock()) | ctx.holds.models())
    data = [
        {"id": m, "object": "model", "created": created, "owned_by": "kvstack", "root": m} for m in models
    ]
    return {"object": "list", "data": data}


def create_app(settings: RouterSettings, registry: EngineRegistry | None = None) -> Any:
    """The router as an ASGI app (wrapped in the request-id middleware)."""
    ctx = build_context(settings, registry)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with _running(ctx):
            yield

    app = FastAPI(
        title="kvstack router",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        # a 307 to the path without the slash would be built from the client's Host header
        redirect_slashes=False,
    )
    install(app, PROXIED, stored_operations())
    app.state.ctx = ctx
    direct: dict[str, ASGIApp] = {}
    for path, kind in PROXIED:
        endpoint = ProxyEndpoint(ctx, kind, path)
        direct[path] = endpoint
        # also routed by FastAPI, which answers other methods with an OpenAI-shaped 405
        app.router.routes.append(Route(path, endpoint, methods=["POST"]))
    for path, method in STORED_ROUTES:  # /v1/responses/{response_id}[/cancel]: to the engine holding it
        app.router.routes.append(Route(path, StoredResponseEndpoint(ctx, path), methods=[method]))

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, err: OpenAIError) -> JSONResponse:
        return _error(err.status, err.message, err.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        problem = err.errors()[0] if err.errors() else {}
        loc = ".".join(str(p) for p in problem.get("loc", ()) if p not in ("body", "query", "path"))
        return _error(400, f"{loc or 'request'}: {problem.get('msg', 'invalid request')}", loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))

    def require_key(request: Request) -> None:
        # Proxied routes check keys themselves; this guards the admin routes that need a key.
        auth = request.headers.get("authorization", "").encode("latin-1") or None
        if ctx.keys.enabled and ctx.keys.identify(auth) is None:
            ctx.metrics.rejections.labels("auth").inc()
            raise OpenAIError(401, "invalid or missing API key")

    @app.get("/v1/models", dependencies=[Depends(require_key)], responses=error_responses(401))
    async def list_models() -> dict[str, Any]:
        return _models_payload(ctx)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    started, was_ready = ctx.clock(), False

    @app.get("/ready", responses=READY_RESPONSES)
    async def ready(require_engine: bool = True) -> JSONResponse:
        nonlocal was_ready
        now = ctx.clock()
        up = {e.url for e in ctx.registry.all() if e.available(now)}
        syncing = len(up.intersection(ctx.policy.syncing()))
        found = readiness(
            len(up), syncing, now - started, settings.ready_sync_timeout_s, was_ready, require_engine
        )
        was_ready = was_ready or found.latches
        body = {
            "ready": found.ready,
            "reason": found.reason,
            "available_engines": len(up),
            "syncing_engines": syncing,
            "engines": len(ctx.registry),
        }
        if found.ready:
            return JSONResponse(body)
        return JSONResponse(body, status_code=503, headers={"retry-after": "1"})

    # on its own port nothing but the scraper reaches it; on the API port it takes an API key
    metrics_guard = [] if settings.metrics_port is not None else [Depends(require_key)]

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses=METRICS_RESPONSES,
        dependencies=metrics_guard,
    )
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/router/engines", dependencies=[Depends(require_key)], responses=error_responses(401))
    async def engines(available: bool | None = Query(None)) -> dict[str, Any]:
        now = ctx.clock()
        rows = [
            {
                "name": e.name,
                "url": e.url,
                "models": sorted(e.models),
                "available": e.available(now),
                "healthy": e.healthy,
                "ejected_for_s": max(0.0, e.ejected_until - now),
                "consecutive_failures": e.consecutive_failures,
                "in_flight": e.in_flight,
                "num_running": e.num_running,
                "num_waiting": e.num_waiting,
                "kv_cache_usage": e.kv_cache_usage,
            }
            for e in ctx.registry.all()
            if available is None or e.available(now) == available
        ]
        return {"engines": rows}

    return RequestIdMiddleware(app, direct, settings.metrics_port)
