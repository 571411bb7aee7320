"""Reliability harness: the router test harness (simulators, router in a thread, bad engines), plus
the router and Redis as real child processes that can be killed and restarted on the same port."""

from __future__ import annotations

import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import free_port

# the router suite's fixtures, shared rather than duplicated
from tests.router.conftest import router, sims, slow_sims

from kvstack.common.procs import ManagedProcess
from kvstack.common.waits import wait_until

__all__ = ["router", "sims", "slow_sims"]

KVSTACK = str(Path(sys.executable).with_name("kvstack"))


def wait_port(port: int, timeout: float = 10.0) -> None:
    def listening() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_until(listening, f"a listener on 127.0.0.1:{port}", timeout, 0.05)


def router_process(
    log_dir: Path, port: int, engines: list[str], *extra: str, env: dict[str, str] | None = None
) -> ManagedProcess:
    """``kvstack router`` as a child process on ``port`` (restartable on the same port)."""
    argv = [KVSTACK, "router", "--port", str(port), *extra]
    for url in engines:
        argv += ["--engine", url]
    env = {"KVSTACK_ROUTER_MONITOR__PROBE_INTERVAL": "0.2", "KVSTACK_ROUTER_MONITOR__SCRAPE_INTERVAL": "0.2",
           **(env or {})}  # fmt: skip
    return ManagedProcess(
        f"router-{port}", argv, log_dir, env=env, ready_url=f"http://127.0.0.1:{port}/ready"
    )


class Redis:
    """A redis-server we own; ``kill`` and ``start`` again (same port, empty) simulate an outage."""

    def __init__(self, log_dir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)", pytrace=False)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        argv = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(log_dir)]
        self.proc = ManagedProcess(f"redis-{self.port}", argv, log_dir)

    def start(self) -> None:
        self.proc.start()
        wait_port(self.port)

    def kill(self) -> None:
        self.proc.stop(timeout=0)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()
