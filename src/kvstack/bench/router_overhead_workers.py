"""``kvstack bench router --workers 1 --workers 2``: the router's scaling over worker processes.

A router with ``workers: N`` is a supervisor and N worker processes (router/workers.py), so what it
costs is the whole process tree: CPU and RSS are summed over the supervisor and its descendants.
The scaling table puts each backend's rows side by side (pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvstack.common.procs import descendants, tree_cpu_seconds, tree_memory_mb

__all__ = ["descendants", "label", "scaling", "tree_cpu_seconds", "tree_memory_mb", "wait_workers"]


def label(backend: str, workers: int) -> str:
    return backend if workers == 1 else f"{backend}-w{workers}"


def scaling(verdicts: list[dict[str, Any]], backends: list[str], workers: list[int]) -> list[dict[str, Any]]:
    """Per backend and worker count: the highest closed-loop rates, CPU per request and the
    speed-up over the first worker count measured."""
    by_label = {v["backend"]: v for v in verdicts}
    rows: list[dict[str, Any]] = []
    for backend in backends:
        base: dict[str, Any] | None = None
        for n in workers:
            v = by_label.get(label(backend, n))
            if v is None:
                continue
            base = base or v
            rows.append(
                {
                    "backend": backend,
                    "workers": n,
                    "rps_nonstream": v["rps_nonstream"],
                    "rps_stream": v["rps_stream"],
                    "cpu_ms_per_request": v["cpu_ms_per_request"],
                    "added_p50_ms": v["added_p50_ms"],
                    "speedup_nonstream": v["rps_nonstream"] / base["rps_nonstream"]
                    if base["rps_nonstream"]
                    else 0.0,
                    "speedup_stream": v["rps_stream"] / base["rps_stream"] if base["rps_stream"] else 0.0,
                }
            )
    return rows


def listeners(port: int) -> int:
    """TCP sockets listening on ``port`` (each worker's ``SO_REUSEPORT`` socket is one)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                count += 1
    return count


def wait_workers(router: Any, workers: int) -> None:
    """Until every worker listens: /ready answers once the first one does."""
    from kvstack.common.waits import wait_until

    port = int(str(router.ready_url).rsplit(":", 1)[1].split("/", 1)[0])
    wait_until(lambda: listeners(port) >= workers, f"{workers} router workers listening", 120, 0.1)
