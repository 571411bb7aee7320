"""``kvstack up``: simulated (or real) vLLM engines behind the router on localhost, until Ctrl-C."""

from __future__ import annotations

from typing import Annotated

import typer

from kvstack.common.cli_errors import exits_on_config_error


@exits_on_config_error
def up(
    engines: Annotated[int | None, typer.Option(help="How many engines (default 2).")] = None,
    engine: Annotated[str | None, typer.Option(help="sim (default) or vllm (needs GPUs).")] = None,
    model: Annotated[str | None, typer.Option(help="Model to serve (default: the simulator's).")] = None,
    host: Annotated[str | None, typer.Option(help="Router address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Router port (default 8000).")] = None,
    policy: Annotated[
        str | None,
        typer.Option(
            help="Routing policy: cache_aware (default), least_loaded, round_robin, session, prefix_trie."
        ),
    ] = None,
    speed: Annotated[float | None, typer.Option(help="Simulator speed (simulated s per wall s).")] = None,
    ready_timeout: Annotated[float | None, typer.Option(help="Seconds to wait for readiness.")] = None,
    prometheus: Annotated[
        bool, typer.Option("--prometheus", help="Also run Prometheus (scrapes everything, kvstack's rules).")
    ] = False,
    prometheus_port: Annotated[int | None, typer.Option(help="Prometheus port (default 9090).")] = None,
    lmcache: Annotated[
        bool,
        typer.Option(
            "--lmcache/--no-lmcache",
            help="Engines share KV through LMCache and a redis-server started here (default on).",
            show_default=False,
        ),
    ] = True,
    tracing_endpoint: Annotated[
        str | None,
        typer.Option(
            metavar="<url>",
            help="OTLP/HTTP receiver (e.g. http://localhost:4318) for the router's and the engines' "
            "spans (default: no tracing).",
        ),
    ] = None,
) -> None:
    """Start engines and the router on localhost, wait until ready, and stop everything on Ctrl-C."""
    from kvstack.common.config import build
    from kvstack.stack.plan import StackSettings
    from kvstack.stack.runner import run_stack

    values = {
        "engines": engines,
        "engine": engine,
        "model": model,
        "host": host,
        "port": port,
        "policy": policy,
        "speed": speed,
        "ready_timeout_s": ready_timeout,
        "prometheus": prometheus or None,
        "prometheus_port": prometheus_port,
        "lmcache": lmcache,
        "tracing_endpoint": tracing_endpoint,
    }
    settings = build(
        StackSettings, "kvstack up options", **{k: v for k, v in values.items() if v is not None}
    )
    raise typer.Exit(run_stack(settings))
