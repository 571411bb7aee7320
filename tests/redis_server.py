"""A real redis-server on a free port for the tests that share LMCache chunks or flush a Redis.

The ``redis_server`` fixture (``tests/conftest.py``) starts one per test; ``kill`` and ``restart``
simulate an outage.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvstack.common.waits import wait_until
from kvstack.stack.plan import redis_argv, redis_url


@dataclass
class RedisServer:
    """A redis-server process we own; ``kill`` and ``restart`` simulate an outage."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return redis_url(self.port)

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        argv = redis_argv(self.port, self.workdir, maxmemory="64mb", binary=exe)
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(self._pongs, "redis-server to answer PING", timeout=10, interval=0.02)
        except AssertionError:
            self.kill()
            raise

    def _pongs(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None
