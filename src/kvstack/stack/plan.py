"""What ``kvstack up`` runs: a pure plan of processes (argv, env, readiness) from its settings.

Adding a component is one more :class:`ProcessSpec` in :func:`plan_stack`. With LMCache on (the
default), a ``redis-server`` of our own is LMCache's shared tier: every engine's connector points at
it, and all engines hash chunks with the same ``PYTHONHASHSEED``, so a prefix one engine computed is
loaded from Redis by the others, as pods share KV in the cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvstack.common.otlp import sdk_missing, traces_url
from kvstack.common.procs import kvstack_argv
from kvstack.engine.sim.cli import kv_events_flags
from kvstack.router.discovery.static import sim_engine_entry
from kvstack.router.policies import policy_names

SIM_MODEL = "kvstack/sim-8b"


class StackSettings(BaseModel):
    """Options of ``kvstack up``."""

    model_config = ConfigDict(extra="forbid")

    engines: int = Field(2, ge=1, le=64)
    engine: Literal["sim", "vllm"] = "sim"
    model: str | None = None  # default: the simulator's model; required for vllm
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    policy: str = "cache_aware"  # the router's routing policy
    speed: float | None = Field(None, gt=0)  # simulator only: simulated seconds per wall second
    ready_timeout_s: float = Field(0.0, ge=0)  # 0: 60 s for simulators, 600 s for vLLM
    prometheus: bool = False  # also run Prometheus scraping everything, with kvstack's rules
    prometheus_port: int = Field(9090, ge=1, le=65535)
    lmcache: bool = True  # engines run the LMCache connector, sharing KV through a redis-server we start
    # an OTLP/HTTP receiver for the router's spans and the engines' (--otlp-traces-endpoint); None: off
    tracing_endpoint: str | None = None

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        known = policy_names()
        if name not in known:
            raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(known)}")
        return name

    @field_validator("tracing_endpoint")
    @classmethod
    def _otlp_url(cls, endpoint: str | None) -> str | None:
        if endpoint is not None:
            traces_url(endpoint)  # raises ValueError naming what is wrong
            if (missing := sdk_missing()) is not None:  # the router and the simulators would fail on it
                raise ValueError(missing)
        return endpoint

    @model_validator(mode="after")
    def _vllm_needs_model(self) -> StackSettings:
        if self.engine == "vllm" and not self.model:
            raise ValueError("--engine vllm needs --model (a Hugging Face id or a local path)")
        if self.engine == "vllm" and self.speed is not None:
            raise ValueError("--speed applies to simulated engines only")
        return self

    @property
    def served_model(self) -> str:
        return self.model or SIM_MODEL

    @property
    def ready_timeout(self) -> float:
        return self.ready_timeout_s or (600.0 if self.engine == "vllm" else 60.0)


@dataclass(frozen=True, slots=True)
class EnginePorts:
    http: int
    kv_events: int
    kv_replay: int


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """One child: its argv, extra environment, and how to tell it is ready."""

    name: str
    argv: list[str]
    ready_url: str | None  # an HTTP URL that answers 200 once ready
    env: dict[str, str] = field(default_factory=dict)
    ready_redis_port: int | None = None  # a loopback Redis port that answers PING once ready


# LMCache hashes chunks with PYTHONHASHSEED: engines share chunks only when they share the seed.
SHARED_HASH_SEED = "0"
REDIS_BINARY = "redis-server"


def redis_url(port: int) -> str:
    return f"redis://127.0.0.1:{port}"


def redis_argv(
    port: int, workdir: Path, *, maxmemory: str = "256mb", binary: str = REDIS_BINARY
) -> list[str]:
    """A throwaway redis-server on loopback: no persistence, ``maxmemory`` bound, LRU like the chart's."""
    return [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--maxmemory",
        maxmemory,
        "--maxmemory-policy",
        "allkeys-lru",
    ]


def redis_spec(port: int, workdir: Path, binary: str = REDIS_BINARY) -> ProcessSpec:
    """LMCache's shared tier for ``kvstack up``: :func:`redis_argv`, ready once it answers PING."""
    return ProcessSpec("redis", redis_argv(port, workdir, binary=binary), None, ready_redis_port=port)


def engine_entries(settings: StackSettings, ports: list[EnginePorts]) -> list[dict[str, Any]]:
    """The router's engines file: URLs, names and KV-event endpoints of every engine."""
    return [
        sim_engine_entry(
            f"engine-{i}",
            http=p.http,
            kv_events=p.kv_events,
            kv_replay=p.kv_replay,
            models=[settings.served_model],
        )
        for i, p in enumerate(ports)
    ]


def _engine(settings: StackSettings, i: int, p: EnginePorts, redis_port: int | None) -> ProcessSpec:
    ready = f"http://127.0.0.1:{p.http}/health"
    if settings.engine == "sim":
        argv = kvstack_argv(
            "engine",
            "sim",
            "--host",
            "127.0.0.1",
            "--port",
            str(p.http),
            "--model",
            settings.served_model,
            *kv_events_flags(p.kv_events, p.kv_replay),
        )
        if settings.speed is not None:
            argv += ["--speed", str(settings.speed)]
        if settings.tracing_endpoint is not None:
            argv += ["--otlp-traces-endpoint", settings.tracing_endpoint]
        if not settings.lmcache:
            return ProcessSpec(f"engine-{i}", argv, ready)
        argv += ["--lmcache"]
        if redis_port is not None:
            argv += ["--lmcache-remote-url", redis_url(redis_port)]
        return ProcessSpec(f"engine-{i}", argv, ready, {"PYTHONHASHSEED": SHARED_HASH_SEED})
    env = {
        "KVSTACK_ENGINE_MODEL": settings.served_model,
        "KVSTACK_ENGINE_PORT": str(p.http),
        "KVSTACK_ENGINE_KV_EVENTS__ENABLED": "true",
        "KVSTACK_ENGINE_KV_EVENTS__ENDPOINT": f"tcp://127.0.0.1:{p.kv_events}",
        "KVSTACK_ENGINE_KV_EVENTS__REPLAY_ENDPOINT": f"tcp://127.0.0.1:{p.kv_replay}",
        "CUDA_VISIBLE_DEVICES": str(i),  # one GPU per engine
        "PYTHONHASHSEED": SHARED_HASH_SEED,
        "KVSTACK_ENGINE_LMCACHE__ENABLED": "true" if settings.lmcache else "false",
    }
    if settings.lmcache and redis_port is not None:
        env["KVSTACK_ENGINE_LMCACHE__REMOTE_URL"] = redis_url(redis_port)
    if settings.tracing_endpoint is not None:
        # vLLM's http/protobuf exporter posts to the URL as given: a collector's base URL needs the path
        env["KVSTACK_ENGINE_OTLP_TRACES_ENDPOINT"] = traces_url(settings.tracing_endpoint)
    return ProcessSpec(f"engine-{i}", kvstack_argv("engine", "serve"), ready, env)


def plan_stack(
    settings: StackSettings,
    ports: list[EnginePorts],
    engines_file: Path,
    redis_port: int | None = None,
) -> list[ProcessSpec]:
    """Redis (with LMCache, on ``redis_port``), the engines, then the router (reading ``engines_file``).

    Started and waited for in this order, stopped in reverse.
    """
    specs: list[ProcessSpec] = []
    if settings.lmcache:
        if redis_port is None:
            raise ValueError("LMCache's shared tier needs a Redis port")
        specs.append(redis_spec(redis_port, engines_file.parent))
    specs += [_engine(settings, i, p, redis_port) for i, p in enumerate(ports)]
    router = kvstack_argv(
        "router",
        "--host",
        settings.host,
        "--port",
        str(settings.port),
        "--engines-file",
        str(engines_file),
        "--policy",
        settings.policy,
    )
    if settings.tracing_endpoint is not None:
        router += ["--tracing-endpoint", settings.tracing_endpoint]  # an endpoint turns tracing on
    specs.append(ProcessSpec("router", router, f"http://127.0.0.1:{settings.port}/ready"))
    return specs


def banner(settings: StackSettings, ports: list[EnginePorts], redis_port: int | None = None) -> str:
    """What to print once the stack is ready: the URLs, a curl and an openai-python example."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{host}:{settings.port}"
    model = settings.served_model
    kind = "simulated" if settings.engine == "sim" else "vLLM"
    engines = " ".join(f"http://127.0.0.1:{p.http}" for p in ports)
    lmcache = (
        f"  LMCache:     shared tier {redis_url(redis_port)} (engines load prefixes others computed)\n"
        if settings.lmcache and redis_port is not None
        else "  LMCache:     off\n"
    )
    tracing = (
        f"  Tracing:     spans of the router and the engines to {settings.tracing_endpoint}\n"
        if settings.tracing_endpoint is not None
        else ""
    )
    prometheus = (
        f"  Prometheus:  http://127.0.0.1:{settings.prometheus_port} (kvstack's rules loaded; "
        "`kvstack dashboards preview --prometheus URL` renders the dashboards)\n\n"
        if settings.prometheus
        else ""
    )
    return f"""
kvstack is up: {settings.engines} {kind} engine(s) behind the router (policy: {settings.policy})
  OpenAI API:  {url}/v1        metrics: {url}/metrics
  Engines:     {engines}
{lmcache}{tracing}
  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 32}}'

  python -c 'from openai import OpenAI
c = OpenAI(base_url="{url}/v1", api_key="unused")
r = c.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hello!"}}])
print(r.choices[0].message.content)'

{prometheus}Press Ctrl-C to stop.
"""


# What to do about a program that is not installed, by its name on PATH.
_INSTALL_HINTS = {
    REDIS_BINARY: "LMCache's shared tier; install it with `make sysdeps` or run with --no-lmcache",
    "prometheus": "install it with `make sysdeps` or run without --prometheus",
}


def preflight(
    settings: StackSettings,
    programs: list[str],
    which: Callable[[str], str | None],
    port_free: Callable[[str, int], bool],
) -> list[str]:
    """Problems that would stop the stack, found before anything starts (one line each).

    ``programs`` are the argv[0] of every process to start; ``which`` and ``port_free`` look at
    the machine (``shutil.which`` and a bind attempt), so this stays a pure function.
    """
    problems = []
    for program in dict.fromkeys(programs):
        if which(program) is None:
            hint = _INSTALL_HINTS.get(program, "is it installed?")
            problems.append(f"{program} not found on PATH ({hint})")
    listens = [(settings.host, settings.port, "--port")]
    if settings.prometheus:
        listens.append(("127.0.0.1", settings.prometheus_port, "--prometheus-port"))
    for host, port, flag in listens:
        if not port_free(host, port):
            problems.append(f"port {port} on {host} is in use ({flag} picks another)")
    return problems
