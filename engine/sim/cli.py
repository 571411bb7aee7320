"""``kvstack engine sim``: serve one simulated vLLM 0.24 pod over HTTP (uvicorn, one worker)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kvstack.common.cli_errors import exits_on_config_error
from kvstack.common.config import build, read_config_file
from kvstack.engine.sim.cli_settings import ServeSettings, split_settings


def kv_events_flags(publisher_port: int, replay_port: int, host: str = "127.0.0.1") -> list[str]:
    """The flags of a simulator that publishes its KV events on ``tcp://host:publisher_port`` and
    answers replay requests on ``tcp://host:replay_port`` (the endpoints its engines-file entry,
    :func:`kvstack.router.discovery.static.sim_engine_entry`, gives the router)."""
    return [
        "--kv-events-endpoint",
        f"tcp://{host}:{publisher_port}",
        "--kv-events-replay-endpoint",
        f"tcp://{host}:{replay_port}",
    ]


_SERVER = "Server"
_ENGINE = "Engine (vLLM flags)"
_LMCACHE = "LMCache connector"
_EVENTS = "KV events"
_LORA = "LoRA adapters"


@exits_on_config_error
def sim(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="YAML file: SimConfig fields and a server: section of the flags below; flags win.",
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(help="Address to bind (default 127.0.0.1; 0.0.0.0 in a pod).", rich_help_panel=_SERVER),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="HTTP port (default 8000; 0 picks a free one).", rich_help_panel=_SERVER),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="VLLM_API_KEY", help="Require this bearer key on /v1/*.", rich_help_panel=_SERVER
        ),
    ] = None,
    gpu_memory_utilization: Annotated[
        float | None,
        typer.Option(help="Reported in vllm:cache_config_info (default 0.9).", rich_help_panel=_SERVER),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(
            help="uvicorn log level: critical, error, warning (default), info, debug, trace.",
            rich_help_panel=_SERVER,
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model name (default kvstack/sim-8b).", rich_help_panel=_ENGINE)
    ] = None,
    served_model_name: Annotated[
        list[str] | None,
        typer.Option(
            help="Name to answer to; repeat for several (default: the model).", rich_help_panel=_ENGINE
        ),
    ] = None,
    task: Annotated[
        list[str] | None,
        typer.Option(
            metavar="<task>",
            help="What the model does: generate (default), transcription, embed, classify, score; "
            "repeat for several. Other tasks' routes are 404.",
            rich_help_panel=_ENGINE,
        ),
    ] = None,
    max_model_len: Annotated[
        int | None, typer.Option(help="Prompt + output token limit (default 32768).", rich_help_panel=_ENGINE)
    ] = None,
    block_size: Annotated[
        int | None, typer.Option(help="Tokens per KV block (default 16).", rich_help_panel=_ENGINE)
    ] = None,
    num_gpu_blocks: Annotated[
        int | None,
        typer.Option(
            help="KV blocks on the simulated GPU (default: an 8B model on an H200).", rich_help_panel=_ENGINE
        ),
    ] = None,
    max_num_seqs: Annotated[
        int | None, typer.Option(help="Most requests running at once (default 256).", rich_help_panel=_ENGINE)
    ] = None,
    max_num_batched_tokens: Annotated[
        int | None,
        typer.Option(
            help="Token budget of one step; longer prefills are chunked (default 8192).",
            rich_help_panel=_ENGINE,
        ),
    ] = None,
    long_prefill_token_threshold: Annotated[
        int | None,
        typer.Option(
            help="Most tokens one request computes in a step, so long prefills share steps "
            "(default 0 = off).",
            rich_help_panel=_ENGINE,
        ),
    ] = None,
    enable_prefix_caching: Annotated[
        bool | None, typer.Option(help="Reuse KV of identical blocks (default on).", rich_help_panel=_ENGINE)
    ] = None,
    speed: Annotated[
        float | None,
        typer.Option(
            help="Simulated seconds per wall-clock second (default 1 = real time).", rich_help_panel=_ENGINE
        ),
    ] = None,
    mean_output_tokens: Annotated[
        float | None,
        typer.Option(
            help="Mean output length when ignore_eos is off (default: run to max_tokens).",
            rich_help_panel=_ENGINE,
        ),
    ] = None,
    gpu_share: Annotated[
        float | None,
        typer.Option(
            help="Fraction of one GPU this engine gets: steps last step_time / share (default 1; "
            "0.26 fits two busy engines sharing the H200 run's GPU).",
            rich_help_panel=_ENGINE,
        ),
    ] = None,
    gpu_peers_dir: Annotated[
        Path | None,
        typer.Option(
            help="A folder the engines of one simulated GPU share: the share then follows how many are "
            "busy (shared_gpu.share_by_busy, from --config).",
            rich_help_panel=_ENGINE,
        ),
    ] = None,
    token_cost_scale: Annotated[
        float | None,
        typer.Option(
            help="Model tokens per simulated token in the cost model (default 1; 2.1 for the H200 "
            "run's BPE tokenizer).",
            rich_help_panel=_ENGINE,
        ),
    ] = None,
    lmcache: Annotated[
        bool | None, typer.Option(help="Attach the simulated LMCache connector.", rich_help_panel=_LMCACHE)
    ] = None,
    lmcache_store_us_per_token: Annotated[
        float | None,
        typer.Option(
            help="Synchronous offload cost per computed prompt token, charged when a prefill ends, "
            "tiers on or off (default 0; 4.49 fits the H200 logs).",
            rich_help_panel=_LMCACHE,
        ),
    ] = None,
    lmcache_store_us_per_request: Annotated[
        float | None,
        typer.Option(
            help="Fixed part of that offload per request (default 0; 790 fits the H200 logs).",
            rich_help_panel=_LMCACHE,
        ),
    ] = None,
    lmcache_remote_url: Annotated[
        str | None,
        typer.Option(help="Shared store, redis://HOST:PORT (default none).", rich_help_panel=_LMCACHE),
    ] = None,
    lmcache_chunk_size: Annotated[
        int | None, typer.Option(help="Tokens per LMCache chunk (default 256).", rich_help_panel=_LMCACHE)
    ] = None,
    lmcache_kv_events: Annotated[
        bool | None,
        typer.Option(
            help="Publish CPU-tier chunk stores as KV events (default off, as in LMCache).",
            rich_help_panel=_LMCACHE,
        ),
    ] = None,
    enable_lora: Annotated[
        bool | None,
        typer.Option(
            "--enable-lora", help="Serve LoRA adapters on the base model (as vLLM).", rich_help_panel=_LORA
        ),
    ] = None,
    max_loras: Annotated[
        int | None,
        typer.Option(help="Distinct adapters in one step, the GPU slots (default 1).", rich_help_panel=_LORA),
    ] = None,
    max_lora_rank: Annotated[
        int | None,
        typer.Option(help="Largest adapter rank: 1, 8, 16 (default), 32 ... 512.", rich_help_panel=_LORA),
    ] = None,
    max_cpu_loras: Annotated[
        int | None,
        typer.Option(help="Adapters kept in CPU memory (default: max-loras).", rich_help_panel=_LORA),
    ] = None,
    lora_modules: Annotated[
        list[str] | None,
        typer.Option(
            help="Adapter to load at start, name=path or JSON; repeat for several. Runtime loading needs "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true.",
            rich_help_panel=_LORA,
        ),
    ] = None,
    kv_events_endpoint: Annotated[
        str | None,
        typer.Option(
            help="ZMQ PUB endpoint to bind, e.g. tcp://*:5557 (default: no events).", rich_help_panel=_EVENTS
        ),
    ] = None,
    kv_events_replay_endpoint: Annotated[
        str | None,
        typer.Option(
            help="ZMQ ROUTER endpoint answering replays, e.g. tcp://*:5558.", rich_help_panel=_EVENTS
        ),
    ] = None,
    kv_events_topic: Annotated[
        str | None,
        typer.Option(help="Topic frame of each message (default kv-events).", rich_help_panel=_EVENTS),
    ] = None,
    otlp_traces_endpoint: Annotated[
        str | None,
        typer.Option(
            metavar="<url>",
            help="OTLP/HTTP receiver for a span per request, as vLLM's flag (default: none).",
            rich_help_panel=_SERVER,
        ),
    ] = None,
) -> None:
    """Run the CPU simulator of one vLLM 0.24 pod (OpenAI API, /metrics, KV events).

    It answers like vLLM (routes, errors, metric families, KV-event wire format) with step times fitted
    to an H200. In a pod: --host 0.0.0.0 --kv-events-endpoint tcp://*:5557.
    """
    from kvstack.engine.sim.config import SimConfig
    from kvstack.engine.sim.lora import LoRAModule

    try:
        modules = [LoRAModule.parse(m).model_dump() for m in lora_modules] if lora_modules else None
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--lora-modules") from None
    file_values = read_config_file(config) if config is not None else {}
    engine_values, server_values = split_settings(
        file_values,
        {
            "model": model,
            "served_model_names": served_model_name or None,
            "tasks": task or None,
            "max_model_len": max_model_len,
            "block_size": block_size,
            "num_gpu_blocks": num_gpu_blocks,
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max_num_batched_tokens,
            "long_prefill_token_threshold": long_prefill_token_threshold,
            "enable_prefix_caching": enable_prefix_caching,
            "speed": speed,
            "mean_output_tokens": mean_output_tokens,
            "gpu_share": gpu_share,
            "shared_gpu": {"peers_dir": gpu_peers_dir},
            "token_cost_scale": token_cost_scale,
            "lmcache": {
                "enabled": lmcache,
                "store_us_per_token": lmcache_store_us_per_token,
                "store_us_per_request": lmcache_store_us_per_request,
                "remote_url": lmcache_remote_url,
                "chunk_size": lmcache_chunk_size,
                "kv_events": lmcache_kv_events,
            },
            "lora": {
                "enabled": enable_lora,
                "max_loras": max_loras,
                "max_lora_rank": max_lora_rank,
                "max_cpu_loras": max_cpu_loras,
                "modules": modules,
            },
        },
        {
            "host": host,
            "port": port,
            "api_key": api_key,
            "kv_events_endpoint": kv_events_endpoint,
            "kv_events_replay_endpoint": kv_events_replay_endpoint,
            "kv_events_topic": kv_events_topic,
            "gpu_memory_utilization": gpu_memory_utilization,
            "log_level": log_level,
            "otlp_traces_endpoint": otlp_traces_endpoint,
        },
    )
    sim_config = build(SimConfig, "simulator config", **engine_values)
    settings = build(ServeSettings, "server settings", **server_values)
    _serve(sim_config, settings)


def _serve(config: Any, settings: ServeSettings) -> None:
    import asyncio
    import socket

    import uvicorn
    import uvloop

    from kvstack.engine.sim.core import SimEngine
    from kvstack.engine.sim.events import KVEventPublisher
    from kvstack.engine.sim.server import SimServer

    events = None
    if settings.kv_events_endpoint:
        events = KVEventPublisher(
            settings.kv_events_endpoint,
            replay_endpoint=settings.kv_events_replay_endpoint,
            topic=settings.kv_events_topic,
        )
    app: Any = SimServer(
        config,
        SimEngine,
        api_key=settings.api_key,
        events=events,
        gpu_memory_utilization=settings.gpu_memory_utilization,
    )
    provider = None
    if settings.otlp_traces_endpoint:
        from kvstack.engine.sim.tracing import TracedApp, sim_tracer_provider

        provider = sim_tracer_provider(settings.otlp_traces_endpoint)
        app = TracedApp(app, provider)

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:  # one line once the socket listens: scripts wait for it
                names = ", ".join(config.served_names)
                bound = self.servers[0].sockets[0].getsockname()[1] if self.servers else settings.port
                host = f"[{settings.host}]" if ":" in settings.host else settings.host
                typer.echo(f"kvstack engine sim: serving {names} on http://{host}:{bound}")

    server = _Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            access_log=False,
            log_level=settings.log_level,
            timeout_graceful_shutdown=5,
        )
    )
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(server.serve())
    finally:
        if provider is not None:
            provider.shutdown()  # exports the spans still queued
    if not server.started:
        raise typer.Exit(code=1)
