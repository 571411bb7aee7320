"""``kvstack router``: the OpenAI-compatible cache-aware gateway.

Flags override ``KVSTACK_ROUTER_*`` variables, which override ``--config FILE``. API keys are never
flags (they would show in ``ps``): use ``KVSTACK_ROUTER_API_KEYS`` or ``--api-keys-file``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kvstack.common.cli_errors import exits_on_config_error

if TYPE_CHECKING:
    from kvstack.router.config import RouterSettings


@exits_on_config_error
def run_router(
    config: Annotated[Path | None, typer.Option("--config", help="YAML/JSON file of settings.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (default 8000).")] = None,
    workers: Annotated[
        str | None,
        typer.Option(
            metavar="<n|auto>",
            help="Router processes serving the port together (default 1); auto or 0: one per usable core.",
        ),
    ] = None,
    engine: Annotated[
        list[str] | None, typer.Option("--engine", help="Engine base URL; repeat for several.")
    ] = None,
    engines_file: Annotated[Path | None, typer.Option(help="YAML/JSON list of engines, watched.")] = None,
    model: Annotated[
        list[str] | None, typer.Option("--model", help="Model the --engine URLs serve (else asked).")
    ] = None,
    discovery: Annotated[str | None, typer.Option(help="static or kubernetes.")] = None,
    policy: Annotated[
        str | None, typer.Option(help="cache_aware, least_loaded, round_robin, session or prefix_trie.")
    ] = None,
    upstream_backend: Annotated[str | None, typer.Option(help="aiohttp (default) or httpx.")] = None,
    api_keys_file: Annotated[Path | None, typer.Option(help="File of accepted API keys.")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error.")] = None,
    tracing: Annotated[
        bool | None,
        typer.Option(
            "--tracing/--no-tracing", help="OTLP spans of each request (default off).", show_default=False
        ),
    ] = None,
    tracing_endpoint: Annotated[
        str | None,
        typer.Option(
            metavar="<url>", help="OTLP/HTTP receiver, e.g. http://collector:4318 (turns tracing on)."
        ),
    ] = None,
    tracing_service_name: Annotated[
        str | None, typer.Option(metavar="<name>", help="service.name of the spans (default kvstack-router).")
    ] = None,
    tracing_sample_ratio: Annotated[
        float | None,
        typer.Option(
            metavar="<ratio>", help="Share of the traces the router starts that are kept (default 1)."
        ),
    ] = None,
    flow_control: Annotated[
        bool | None,
        typer.Option(
            "--flow-control/--no-flow-control",
            help="Queue requests in the router while every engine is saturated (default on).",
        ),
    ] = None,
) -> None:
    """Run the router in front of vLLM engines (or simulators)."""
    from kvstack.router.config import load_settings

    settings = load_settings(
        config,
        host=host,
        port=port,
        workers=workers,
        engines=engine or None,
        engines_file=engines_file,
        models=model or None,
        discovery=discovery,
        policy=policy,
        upstream_backend=upstream_backend,
        api_keys_file=api_keys_file,
        log_level=log_level,
        tracing=tracing_flags(tracing, tracing_endpoint, tracing_service_name, tracing_sample_ratio),
        flow_control=None if flow_control is None else {"enabled": flow_control},
    )
    serve(settings)


def tracing_flags(
    enabled: bool | None, endpoint: str | None, service_name: str | None, sample_ratio: float | None
) -> dict[str, bool | str | float] | None:
    """The ``tracing`` keys the flags set (None: no flag given); an endpoint alone turns tracing on.

    Export headers are never flags (they often carry a vendor's key): ``KVSTACK_ROUTER_TRACING__HEADERS``.
    """
    if enabled is None and endpoint is not None:
        enabled = True
    given = {
        "enabled": enabled,
        "endpoint": endpoint,
        "service_name": service_name,
        "sample_ratio": sample_ratio,
    }
    flags = {k: v for k, v in given.items() if v is not None}
    return flags or None


def serve(settings: RouterSettings) -> None:
    """Serve the router until SIGINT/SIGTERM, with the socket-level guards of router/server.py; with
    ``workers`` other than 1, as that many processes under a supervisor (router/workers.py)."""
    if settings.workers != 1:
        from kvstack.router.supervision import usable_cpus, worker_count

        count = worker_count(settings.workers, usable_cpus())
        if count > 1:
            serve_workers(settings, count)
            return
    from kvstack.router.app import create_app
    from kvstack.router.gc_tuning import tune_gc
    from kvstack.router.logs import configure_logging
    from kvstack.router.server import listen_sockets, make_server

    configure_logging(settings.log_level)
    app = create_app(settings)
    tune_gc(settings.gc_gen0_threshold)  # process-wide, so here and not in the app factory
    server = make_server(settings, app, app.app.state.ctx.metrics.reject)
    server.run(sockets=listen_sockets(settings))


def serve_workers(settings: RouterSettings, count: int) -> None:
    """The supervisor of ``count`` router processes; exits 1 when they keep dying."""
    from kvstack.router.logs import configure_logging
    from kvstack.router.workers import Supervisor

    configure_logging(settings.log_level)
    code = Supervisor(settings, count).run()
    if code:
        raise typer.Exit(code)
