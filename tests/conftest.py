"""Shared fixtures: where the reference data lives (``tests/reference``), free local ports, a real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.redis_server import RedisServer

from kvstack.common.procs import free_port  # re-exported: test modules import it from here

# The session-wide Kubernetes test cluster (fixtures ``cluster``, ``namespace``, ``cluster_tools``):
# registered once here, so every folder shares one cluster per test session.
pytest_plugins = ["kvstack_testing.pytest_plugin"]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The folder of ground truth read off real vLLM 0.24 (metrics, KV events, H200 timings)."""
    return ROOT / "tests" / "reference"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def unused_port() -> int:
    return free_port()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own on a free port (skips where none is installed)."""
    server = RedisServer(free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()
