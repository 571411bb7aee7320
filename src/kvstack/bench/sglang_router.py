"""The SGLang router (PyPI ``sglang-router``, its Rust gateway) as a baseline for ``kvstack bench router``:
started in front of the same simulators, ready once every worker is registered and healthy."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvstack.common.procs import free_port

SGLANG_POLICIES = ("cache_aware", "round_robin")


def sglang_argv(policy: str, urls: Sequence[str], port: int, metrics_port: int) -> list[str]:
    """The SGLang router in front of ``urls`` (its own Prometheus port: its default is shared)."""
    return [
        sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
        "--worker-urls", *urls, "--policy", policy, "--prometheus-port", str(metrics_port),
        "--log-level", "warn",
    ]  # fmt: skip


def sglang_router(policy: str, urls: Sequence[str], logs: Path) -> Any:
    from kvstack.common.procs import ManagedProcess

    port = free_port()
    argv = sglang_argv(policy, urls, port, free_port())
    return ManagedProcess(f"sglang-{policy}", argv, logs, ready_url=f"http://127.0.0.1:{port}/readiness")


def sglang_workers_healthy(answer: Any, expected: int) -> bool:
    """Whether the SGLang router's ``GET /workers`` lists ``expected`` healthy workers (pure). Its
    /readiness answers before the workers are registered, which takes it a few seconds."""
    workers = answer.get("workers") if isinstance(answer, dict) else None
    return isinstance(workers, list) and sum(bool(w.get("is_healthy")) for w in workers) >= expected


def wait_sglang_workers(router: Any, expected: int) -> None:
    import httpx

    from kvstack.common.waits import wait_until

    url = str(router.ready_url).rsplit("/", 1)[0] + "/workers"

    def healthy() -> bool:
        try:
            return sglang_workers_healthy(httpx.get(url, timeout=5).json(), expected)
        except (httpx.HTTPError, ValueError):
            return False

    wait_until(healthy, f"the SGLang router to register {expected} workers", timeout=120)
