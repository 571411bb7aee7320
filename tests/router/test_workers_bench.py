"""``kvstack bench router --workers``: the process-tree measures and the scaling table."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from kvstack.bench.router_overhead_workers import (
    descendants,
    label,
    listeners,
    scaling,
    tree_cpu_seconds,
    tree_memory_mb,
)
from kvstack.common.waits import wait_until


def test_labels() -> None:
    assert (label("aiohttp", 1), label("aiohttp", 4)) == ("aiohttp", "aiohttp-w4")


def verdict(backend: str, rps: float, stream: float) -> dict[str, float | str]:
    return {
        "backend": backend,
        "rps_nonstream": rps,
        "rps_stream": stream,
        "cpu_ms_per_request": 1.0,
        "added_p50_ms": 0.5,
    }


def test_scaling_is_relative_to_the_first_count_measured() -> None:
    verdicts = [verdict("aiohttp", 600, 500), verdict("aiohttp-w2", 1100, 900), verdict("httpx", 300, 0)]
    rows = scaling(verdicts, ["aiohttp", "httpx"], [1, 2])
    assert [(r["backend"], r["workers"]) for r in rows] == [("aiohttp", 1), ("aiohttp", 2), ("httpx", 1)]
    assert rows[1]["speedup_nonstream"] == 1100 / 600 and rows[1]["speedup_stream"] == 900 / 500
    assert rows[2]["speedup_stream"] == 0.0  # nothing streamed: no ratio


def test_the_process_tree_counts_children() -> None:
    """A child burning CPU is part of its parent's tree (a supervisor and its workers)."""
    code = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'while True: pass'])"
    parent = subprocess.Popen([sys.executable, "-c", code])
    child = None
    try:
        wait_until(lambda: len(descendants(parent.pid)) == 2, "the child to start", 30, 0.02)
        child = descendants(parent.pid)[1]
        wait_until(lambda: tree_cpu_seconds(parent.pid) > 0.2, "the child's CPU in the tree", 30, 0.05)
        assert tree_memory_mb(parent.pid) > tree_memory_mb(child) > 0
    finally:
        if child is not None:
            os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait()


def test_listeners_count_each_reuse_port_socket() -> None:
    socks = []
    try:
        for _ in range(2):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", socks[0].getsockname()[1] if socks else 0))
            socks.append(s)
        port = socks[0].getsockname()[1]
        assert listeners(port) == 0  # bound, not listening (the supervisor's reservation)
        socks[0].listen()
        socks[1].listen()
        assert listeners(port) == 2
    finally:
        for s in socks:
            s.close()
