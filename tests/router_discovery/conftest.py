"""A small real HTTP engine (Starlette on uvicorn, in the test's event loop) whose answers a test
can switch: /health status, /metrics text, /v1/models list; /stall answers only when the engine
stops; it can be stopped and restarted on the same port, like an engine that crashed and came back."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from tests.conftest import free_port

from kvstack.common.waits import wait_until_async
from kvstack.router.fetch import EngineFetch


def vllm_metrics(running: float = 0, waiting: float = 0, usage: float = 0.0, model: str = "m") -> str:
    labels = f'engine="0",model_name="{model}"'
    return "\n".join(
        [
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} {running}",
            f"vllm:num_requests_waiting{{{labels}}} {waiting}",
            f"vllm:kv_cache_usage_perc{{{labels}}} {usage}",
            f'vllm:cache_config_info{{block_size="16",{labels},num_gpu_blocks="1024"}} 1.0',
            "",
        ]
    )


async def until(check: Callable[[], object], what: str, within: float = 10.0) -> None:
    """Poll ``check`` every 10 ms on the test's loop, where the monitor and discovery loops run too."""
    await wait_until_async(check, what, within, 0.01)


class SwitchableEngine:
    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.health_status = 200
        self.metrics_text = vllm_metrics()
        self.filtered_text: str | None = None  # what /metrics/ answers (vLLM: the samples asked); None: 404
        self.models = ["m"]
        self.api_key: str | None = None
        self.hits: collections.Counter[str] = collections.Counter()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._release = asyncio.Event()

    def _app(self) -> Starlette:
        async def health(_: Request) -> Response:
            self.hits["health"] += 1
            return Response(status_code=self.health_status)

        async def metrics(_: Request) -> Response:
            self.hits["metrics"] += 1
            return PlainTextResponse(self.metrics_text)

        async def filtered_metrics(_: Request) -> Response:
            self.hits["filtered_metrics"] += 1
            if self.filtered_text is None:
                return PlainTextResponse("Not Found", status_code=404)
            return PlainTextResponse(self.filtered_text)

        async def models(request: Request) -> Response:
            self.hits["models"] += 1
            if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
                return JSONResponse({"error": {"message": "Unauthorized"}}, status_code=401)
            data = [{"id": m, "object": "model", "root": m, "max_model_len": 4096} for m in self.models]
            return JSONResponse({"object": "list", "data": data})

        async def stall(_: Request) -> Response:
            self.hits["stall"] += 1
            await self._release.wait()
            return Response()

        routes = [
            Route("/health", health),
            Route("/metrics", metrics),
            Route("/metrics/", filtered_metrics),
            Route("/v1/models", models),
            Route("/stall", stall),
        ]
        return Starlette(routes=routes)

    async def start(self) -> None:
        config = uvicorn.Config(
            self._app(), host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._release = asyncio.Event()
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it could not start
                raise RuntimeError("server exited before it started")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._release.set()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            self._server.force_exit = True  # do not wait for keep-alive connections: a crash
            await self._task
        self._server = self._task = None


@pytest.fixture
async def engine() -> AsyncIterator[SwitchableEngine]:
    eng = SwitchableEngine(free_port())
    await eng.start()
    try:
        yield eng
    finally:
        await eng.stop()


@pytest.fixture
async def client() -> AsyncIterator[EngineFetch]:
    """The monitor's client, as the router's app builds it."""
    c = EngineFetch()
    try:
        yield c
    finally:
        await c.aclose()
