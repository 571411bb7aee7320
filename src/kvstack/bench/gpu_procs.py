"""The processes of ``kvstack bench gpu``: simulators standing in for the engines, kvstack's router,
and a peer router (the SGLang router) as the baseline over the same engines."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvstack.common.procs import ManagedProcess, free_ports, kvstack_argv
from kvstack.engine.sim.cli import kv_events_flags
from kvstack.engine.sim.gpu_peers import peers_flags, shared_device
from kvstack.router.discovery.static import sim_engine_entry

# Peer routers run as baselines: bench policy name -> the SGLang router's (`pip install sglang-router`)
PEER_POLICIES = {"sglang_cache_aware": "cache_aware", "sglang_round_robin": "round_robin"}


def sim_procs(
    n: int,
    model: str,
    blocks: int | None,
    log_dir: Path,
    config: Path | None = None,
    redis_url: str | None = None,
    tier_events: bool = True,
    tell_device: bool = True,
) -> tuple[list[ManagedProcess], list[dict[str, Any]]]:
    """``n`` simulators; with ``redis_url`` they run the LMCache connector sharing that Redis, and
    send KV events of their LMCache CPU tier unless ``tier_events`` is off (as vLLM 0.24 with
    LMCache 0.5.3 did on the H200: GPU events only). Simulators sharing one GPU name their device
    for the router unless not to ``tell_device`` (an A/B of the router's shared-device pricing)."""
    ports = free_ports(3 * n)
    procs, entries = [], []
    # the router is told, as real engines on one GPU tell it
    device = shared_device(config) if tell_device else None
    for i in range(n):
        http, pub, replay = ports[3 * i : 3 * i + 3]
        url = f"http://127.0.0.1:{http}"
        argv = [*kvstack_argv(), "engine", "sim", "--port", str(http), "--model", model, "--speed", "1.0"]
        argv += kv_events_flags(pub, replay)
        if blocks:
            argv += ["--num-gpu-blocks", str(blocks)]
        if config is not None:
            argv += ["--config", str(config), *peers_flags(config, log_dir / "gpu")]
        env: dict[str, str] = {}
        if redis_url is not None:
            # the deployment's connector: LMCache tiers, KV events of the CPU tier, Redis shared by
            # engines with one hash seed (PYTHONHASHSEED=0, as the GPU run's engines)
            argv += ["--lmcache", "--lmcache-remote-url", redis_url]
            argv += ["--lmcache-kv-events" if tier_events else "--no-lmcache-kv-events"]
            env["PYTHONHASHSEED"] = "0"
        procs.append(ManagedProcess(f"sim{i}", argv, log_dir, env=env, ready_url=f"{url}/health"))
        entries.append(
            sim_engine_entry(
                f"sim{i}", http=http, kv_events=pub, kv_replay=replay, models=[model], device=device
            )
        )
    return procs, entries


SHARED_STORE_FROM_GPU_ENV = "KVSTACK_ROUTER_CACHE_AWARE__INDEX__SHARED_STORE_FROM_GPU"


def router_proc(
    engines_file: Path,
    policy: str,
    tokenizer: str,
    log_dir: Path,
    traced: bool = False,
    tokenizer_path: Path | None = None,
    shared_store: bool = False,
) -> tuple[ManagedProcess, str]:
    """kvstack's router with ``policy`` over the engines of ``engines_file``; ``shared_store``: the
    engines run LMCache with one shared Redis, so what one prefills the others load from there."""
    port = free_ports(1)[0]
    argv = [*kvstack_argv(), "router", "--port", str(port), "--engines-file", str(engines_file)]
    # traced: the access line (route reason, time to dispatch) and the policy's decision line
    # (DEBUG) of every request, for kvstack.bench.trace
    argv += ["--policy", policy, "--log-level", "debug" if traced else "warning"]
    env = {
        "KVSTACK_ROUTER_ACCESS_LOG": "true" if traced else "false",
        "KVSTACK_ROUTER_EXPOSE_ENGINE_HEADER": "true",
    }
    if tokenizer != "builtin":
        env["KVSTACK_ROUTER_TOKENIZER"] = tokenizer
    if tokenizer_path is not None:
        env["KVSTACK_ROUTER_TOKENIZER_PATH"] = str(tokenizer_path)
    if shared_store:
        env[SHARED_STORE_FROM_GPU_ENV] = "true"
    url = f"http://127.0.0.1:{port}"
    return ManagedProcess(f"router-{policy}", argv, log_dir, env=env, ready_url=f"{url}/ready"), url


def peer_router_proc(urls: Sequence[str], policy: str, log_dir: Path) -> tuple[ManagedProcess, str]:
    """The SGLang router over the same engines: it routes on the request's text (no tokenizing,
    no KV events) and sends no engine header or decision lines, so its trace rows are the client's."""
    port, prom = free_ports(2)
    argv = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--prometheus-port", str(prom), "--worker-urls", *urls]
    argv += ["--policy", PEER_POLICIES[policy], "--log-level", "warn"]
    url = f"http://127.0.0.1:{port}"
    return ManagedProcess(f"router-{policy}", argv, log_dir, ready_url=f"{url}/health"), url
