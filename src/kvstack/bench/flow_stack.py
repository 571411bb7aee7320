"""The stack one policy of ``kvstack bench flow`` is measured on: four simulated engines (or running
real ones) and a router configured for the policy, its flow control on or off.

:class:`FlowSetup` is a run's setup; :func:`router_config` the router's config file for a policy (flow
control's objectives and saturation model in the router's wall time); :func:`stack` the processes
of one policy; :func:`ready_stack` starts them and waits until the router routes to every engine.
"""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvstack.bench import flow_plan
from kvstack.bench.driver import wait_for_engines
from kvstack.bench.flow_plan import Policy, Shape
from kvstack.bench.gpu_procs import PEER_POLICIES
from kvstack.bench.gpu_procs import peer_router_proc as peer_router
from kvstack.bench.sglang_router import wait_sglang_workers
from kvstack.common.procs import ManagedProcess, free_ports, kvstack_argv, running
from kvstack.engine.sim.cli import kv_events_flags
from kvstack.engine.sim.gpu_peers import peers_flags, shared_device
from kvstack.router.discovery.static import sim_engine_entry
from kvstack.router.flow.config import Ordering

MODEL = "kvstack/sim-8b"
DEFAULT_SIM_CONFIG = Path("bench-results/flow/sim-h200-x4.yaml")


@dataclass(slots=True)
class FlowSetup:
    engines: int = 4
    speed: float = 0.5
    sim_config: Path | None = DEFAULT_SIM_CONFIG
    capacity_rps: float = 16.0  # the cluster's capacity, simulated requests/s (1x of the ramp)
    ramp: tuple[float, ...] = flow_plan.RAMP  # the ramp's loads, multiples of the capacity
    duration_s: float = 8.0  # arrival window of a case, simulated seconds
    shape: Shape = field(default_factory=Shape)
    # the client's retries of a refused request (the openai SDK's default: 2); 0: none
    client_retries: int = 2
    # the router's saturation model, in simulated time: the engines' cold prefill rate
    prefill_tokens_per_s: float = 2_100.0
    # an engine takes more while the uncached prompt work the router sent it would prefill within
    # this (simulated) time: half the 1 s objective, the rest for the queue and the first step
    prefill_target_s: float = 0.5
    # real engines instead of simulators (speed 1): their discovery file, served name, and where the
    # router gets prompt tokens (their /tokenize: the model's own tokenizer)
    engines_file: Path | None = None
    model: str = MODEL
    tokenizer: str = "builtin"
    tokenizer_path: Path | None = None  # the model's tokenizer files, for tokenizer "local"
    # real engines keep their prefix caches from case to case, and every policy replays the same
    # traces: each case starts with idle engines, their GPU prefix caches reset (vLLM's dev mode) and
    # the shared Redis flushed when given, so no policy inherits another's warm cache
    fresh_cache: bool = True
    redis_url: str | None = None
    # and the engines' LMCache CPU tiers emptied through LMCache's internal API (gpu_reset)
    lmcache_apis: tuple[str, ...] = ()
    # the router logs each cache-aware decision (DEBUG): each case counts those flow control narrowed
    decision_log: bool = False
    # simulators sharing one GPU (a ``shared_gpu`` table in the sim config) name one device in the
    # router's engines file, as device.sh's engines do on the H200; off: the router is not told
    shared_device: bool = True
    # the model's queue order under flow control (router/flow/ordering.py): fcfs, edf or cheapest
    ordering: Ordering = "fcfs"
    # how long (simulated s) the model counts as overloaded after a queued or refused request (admission
    # rule 1's exception, router/flow/admission.py); None: the router's default
    overload_memory_s: float | None = None
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kvstack-flow-")))


def flow_available() -> bool:
    """Whether this router has flow control (the ``flow_control`` config section)."""
    try:
        return importlib.util.find_spec("kvstack.router.flow.config") is not None
    except ModuleNotFoundError:  # no kvstack.router.flow package at all
        return False


def router_config(setup: FlowSetup, policy: Policy) -> dict[str, Any]:
    """The router's config file: the policy, and flow control on or off.

    With flow control, objectives and the saturation model are in wall time (the router's clock):
    a simulated second lasts ``1 / speed`` wall seconds.
    """
    config: dict[str, Any] = {
        "policy": policy.routing,
        "log_level": "debug" if setup.decision_log else "warning",
        "tokenizer": setup.tokenizer,
        "expose_engine_header": True,  # each request's engine: its first touches (flow_plan)
    }
    if setup.tokenizer_path is not None:
        config["tokenizer_path"] = str(setup.tokenizer_path)
    if not flow_available():
        return config
    if not policy.flow:
        config["flow_control"] = {"enabled": False}
        return config
    objective = flow_plan.OBJECTIVE_S / setup.speed
    config["flow_control"] = {
        "enabled": True,
        "default_class": "default",
        "classes": [
            {"name": "interactive", "priority": 10, "ttft_objective_s": objective},
            {"name": "default", "priority": 5, "ttft_objective_s": objective},
            {"name": "batch", "priority": 0},
        ],
        "tenants": [{"name": "A", "weight": 1.0}, {"name": "B", "weight": 1.0}],
        "models": [{"model": "*", "ordering": setup.ordering}],
        "saturation": {
            "prefill_tokens_per_s": setup.prefill_tokens_per_s * setup.speed,
            "prefill_target_s": setup.prefill_target_s / setup.speed,
        },
    }
    if setup.overload_memory_s is not None:
        config["flow_control"]["saturation"]["overload_memory_s"] = setup.overload_memory_s / setup.speed
    return config


def _router(
    setup: FlowSetup, policy: Policy, engines_file: Path, log_dir: Path
) -> tuple[ManagedProcess, str]:
    if policy.routing in PEER_POLICIES:
        urls = [e["url"] for e in yaml.safe_load(engines_file.read_text())]
        return peer_router(urls, policy.routing, log_dir)
    (log_dir / "router.yaml").write_text(yaml.safe_dump(router_config(setup, policy)))
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    argv = [*kvstack_argv(), "router", "--config", str(log_dir / "router.yaml"), "--port", str(port)]
    argv += ["--engines-file", str(engines_file)]
    env = {"KVSTACK_ROUTER_ACCESS_LOG": "false"}
    return ManagedProcess("router", argv, log_dir, env=env, ready_url=f"{url}/ready"), url


def stack(setup: FlowSetup, policy: Policy, case: str) -> tuple[list[ManagedProcess], str]:
    """The processes of one policy (the simulators, then the router; only the router with real
    engines), logging under ``case``, and the router's URL."""
    log_dir = setup.log_dir / case
    log_dir.mkdir(parents=True, exist_ok=True)
    if setup.engines_file is not None:  # real engines, already running
        router, url = _router(setup, policy, setup.engines_file, log_dir)
        return [router], url
    ports = free_ports(3 * setup.engines)
    sims: list[ManagedProcess] = []
    engines: list[dict[str, Any]] = []
    device = shared_device(setup.sim_config) if setup.shared_device else None
    for i in range(setup.engines):
        http, pub, replay = ports[3 * i : 3 * i + 3]
        url = f"http://127.0.0.1:{http}"
        argv = [*kvstack_argv(), "engine", "sim", "--port", str(http), "--model", MODEL]
        if setup.sim_config is not None:
            argv += ["--config", str(setup.sim_config), *peers_flags(setup.sim_config, log_dir / "gpu")]
        argv += ["--speed", str(setup.speed), *kv_events_flags(pub, replay)]
        sims.append(ManagedProcess(f"sim{i}", argv, log_dir, ready_url=f"{url}/health"))
        engines.append(
            sim_engine_entry(
                f"sim{i}", http=http, kv_events=pub, kv_replay=replay, models=[MODEL], device=device
            )
        )
    (log_dir / "engines.yaml").write_text(yaml.safe_dump(engines))
    router, url = _router(setup, policy, log_dir / "engines.yaml", log_dir)
    return [*sims, router], url


@contextlib.contextmanager
def ready_stack(setup: FlowSetup, policy: Policy) -> Iterator[tuple[list[ManagedProcess], str, list[str]]]:
    """The policy's stack (:func:`stack`) up and routing to every engine: its processes, the
    router's URL and the engines' URLs.

    The engines start first and are ready before the router starts: an SGLang router started beside
    simulators still binding their ports had routed nothing four minutes later. Its ``/health``
    answers before its workers are registered, so the wait is on ``GET /workers``; kvstack's router
    is waited on until it routes to every engine."""
    procs, url = stack(setup, policy, policy.name.replace("+", "-"))
    if setup.engines_file is not None:
        engine_urls = [e["url"] for e in yaml.safe_load(setup.engines_file.read_text())]
    else:
        engine_urls = [p.ready_url.removesuffix("/health") for p in procs[:-1] if p.ready_url]
    with running(procs[:-1], timeout=90), running(procs[-1:], timeout=90):
        if policy.routing in PEER_POLICIES:
            wait_sglang_workers(procs[-1], len(engine_urls))
        else:
            wait_for_engines(url, len(engine_urls))
        yield procs, url, engine_urls
