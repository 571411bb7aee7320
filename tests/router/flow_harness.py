"""What the flow-control tests at run time share: a FlowControl over a real engine registry and
metrics, and the proxy's part of a request (it reaches an engine, it ends)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from kvstack.router.engines import Endpoint, EngineRegistry, EngineState
from kvstack.router.flow.config import FlowControlConfig
from kvstack.router.flow.controller import FlowControl
from kvstack.router.flow.grant import Grant
from kvstack.router.metrics import RouterMetrics

M = "m"


def make(
    n_engines: int = 1,
    timeout: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    max_in_flight: int | None = 1,
    **flow: Any,
) -> tuple[FlowControl, EngineRegistry, RouterMetrics]:
    registry = EngineRegistry()
    registry.sync([Endpoint(f"http://e{i}", f"e{i}", frozenset({M})) for i in range(n_engines)])
    metrics = RouterMetrics(registry, time.monotonic, [M])
    config = FlowControlConfig(**flow)
    control = FlowControl(
        config, registry, metrics, clock, max_in_flight=max_in_flight, queue_timeout_s=timeout, tick_s=60.0
    )
    return control, registry, metrics


def cls(control: FlowControl, name: str = "default") -> Any:
    found = control.config.class_named(name)
    assert found is not None
    return found


async def start(control: FlowControl, engine: EngineState, grant: Grant) -> None:
    """The proxy's part: the request reaches ``engine``."""
    engine.in_flight += 1
    control.dispatched(grant, engine, grant.cost, streamed=False)


async def end(control: FlowControl, engine: EngineState, grant: Grant) -> None:
    engine.in_flight -= 1
    control.finished(grant, engine)
    control.release(grant)


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def queued(metrics: RouterMetrics, klass: str = "default", tenant: str = "other") -> float:
    value = metrics.registry.get_sample_value(
        "kvstack_router_flow_queue_length", {"model_name": M, "class": klass, "tenant": tenant}
    )
    return value or 0.0
