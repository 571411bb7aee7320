"""The processes ``kvstack bench router`` measures: simulators and the engines file that lists them, a
kvstack router in front of them (optionally under cProfile), and the context that serves one router
through a run of phases. The SGLang baseline's process is in :mod:`kvstack.bench.sglang_router`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from kvstack.bench.router_load import MODEL
from kvstack.bench.router_overhead_workers import label
from kvstack.common.procs import ManagedProcess, free_port, kvstack_argv, running
from kvstack.engine.sim.cli import kv_events_flags
from kvstack.router.discovery.static import sim_engine_entry


def sim_processes(
    n: int, speed: float, logs: Path, tag: str = "sim"
) -> tuple[list[ManagedProcess], list[dict[str, Any]]]:
    """``n`` simulators (not started yet), each with its engines-file entry (URL, KV-event feeds)."""
    procs: list[ManagedProcess] = []
    entries: list[dict[str, Any]] = []
    for i in range(n):
        port, pub, replay = free_port(), free_port(), free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [
            *kvstack_argv(), "engine", "sim", "--port", str(port), "--served-model-name", MODEL,
            "--speed", str(speed), "--max-num-seqs", "1024", "--max-num-batched-tokens", "16384",
            "--max-model-len", "4096",
            *kv_events_flags(pub, replay),
        ]  # fmt: skip
        procs.append(ManagedProcess(f"{tag}-{i}", argv, logs, ready_url=f"{url}/health"))
        entries.append(
            sim_engine_entry(f"engine-{i}", http=port, kv_events=pub, kv_replay=replay, models=[MODEL])
        )
    return procs, entries


def write_engines_file(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(entries, sort_keys=False))
    return path


def kvstack_router(
    backend: str,
    policy: str,
    engines_file: Path,
    logs: Path,
    profile: Path | None,
    tag: str = "router",
    workers: int = 1,
) -> ManagedProcess:
    """A kvstack router over ``engines_file`` (not started yet), under cProfile when ``profile``."""
    port = free_port()
    argv = [*kvstack_argv(), "router", "--port", str(port), "--engines-file", str(engines_file)]
    argv += ["--policy", policy, "--upstream-backend", backend, "--log-level", "warning"]
    argv += ["--workers", str(workers)]
    if profile is not None:
        argv = [sys.executable, "-m", "cProfile", "-o", str(profile.resolve()), *argv]
    env = {"KVSTACK_ROUTER_ACCESS_LOG": "false"}
    name = f"{tag}-{label(backend, workers)}"
    return ManagedProcess(name, argv, logs, env=env, ready_url=f"http://127.0.0.1:{port}/ready")


def router_url(router: Any) -> str:
    return str(router.ready_url).rsplit("/", 1)[0]  # its base URL: /ready (kvstack), /readiness (SGLang)


def _write_profile(router: Any) -> None:
    if router.proc is not None:
        os.kill(router.pid, signal.SIGINT)  # cProfile writes its stats on KeyboardInterrupt
        router.proc.wait(60)


@contextmanager
def serving(router: Any, profile: Path | None, ready: Callable[[Any], None] | None) -> Iterator[None]:
    """``router`` started and ready for load (``ready`` waits for what its ready URL does not
    cover); its cProfile stats written when the phases ran through."""
    with running([router]):
        if ready is not None:
            ready(router)
        time.sleep(1.0)  # engines discovered and scraped, KV-event feeds connected
        yield
        if profile is not None:
            _write_profile(router)
