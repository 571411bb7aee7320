"""Real simulator processes for the server tests (``kvstack engine sim`` on free loopback ports), and
the simulator's server run in the test's own process."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from tests.conftest import free_port

from kvstack.common.waits import wait_until
from kvstack.engine.sim.config import SimConfig
from kvstack.engine.sim.core import SimEngine
from kvstack.engine.sim.server import SimServer

KVSTACK = Path(sys.executable).parent / "kvstack"
MODEL = "sim-model"


@dataclass
class Sim:
    """One running simulator process."""

    url: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text


@asynccontextmanager
async def inprocess_sim(config: SimConfig) -> AsyncIterator[httpx.AsyncClient]:
    """A simulator server over the real SimEngine in this process, and an HTTP client of it (through
    ASGI, no socket); the server stops on exit."""
    app = SimServer(config, SimEngine)
    await app.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim") as client:
            yield client
    finally:
        await app.stop()


@contextmanager
def run_sim(*args: str, host: str = "127.0.0.1", ready_timeout: float = 30.0) -> Iterator[Sim]:
    """Start ``kvstack engine sim`` on ``host`` with ``args``, wait for /health, always stop it."""
    port = free_port()
    cmd = [str(KVSTACK), "engine", "sim", "--host", host, "--port", str(port), "--served-model-name", MODEL]
    cmd.extend(args)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://{host}:{port}"

            def healthy() -> bool:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"simulator exited {proc.returncode}: {log.read().decode()[-2000:]}")
                try:
                    return httpx.get(f"{url}/health", timeout=1).status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(healthy, "the simulator's /health", timeout=ready_timeout, interval=0.05)
            yield Sim(url, port, proc)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


SimFactory = Callable[..., AbstractContextManager[Sim]]


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    """A fast simulator shared by a module's read-mostly tests."""
    with run_sim("--speed", "50", "--max-model-len", "2048", "--num-gpu-blocks", "2000") as s:
        yield s
