"""Real simulator processes for the server tests: ``kvstack engine sim`` on free loopback ports."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from tests.conftest import free_port

from kvstack.common.waits import wait_until

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
