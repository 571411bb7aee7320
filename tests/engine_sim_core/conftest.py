"""Fixtures for the simulator core: a real redis-server on a free port, and a recording listener."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.conftest import free_port

from kvstack.common.waits import wait_until
from kvstack.engine.sim.latency import StepWork
from kvstack.engine.sim.types import FinishedRequestStats


@dataclass
class RedisServer:
    """A redis-server process we own; ``kill`` and ``restart`` simulate an outage."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--maxmemory",
                "64mb",
                "--maxmemory-policy",
                "allkeys-lru",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
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


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@dataclass
class Recorder:
    """A StatsListener that keeps everything it is told."""

    iterations: list[tuple[int, int]] = field(default_factory=list)  # (prompt, generation) tokens
    prefix_queries: list[tuple[int, int]] = field(default_factory=list)
    external_queries: list[tuple[int, int]] = field(default_factory=list)
    prompt_sources: list[tuple[int, int, int]] = field(default_factory=list)
    preemptions: int = 0
    lora_steps: list[tuple[list[str], list[str], int]] = field(default_factory=list)
    lmcache_retrieves: list[tuple[int, int, float]] = field(default_factory=list)
    lmcache_stores: list[tuple[int, float]] = field(default_factory=list)
    lmcache_cpu_bytes: list[int] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)
    finished_event: asyncio.Event = field(default_factory=asyncio.Event)

    def on_iteration(self, num_prompt_tokens: int, num_generation_tokens: int) -> None:
        self.iterations.append((num_prompt_tokens, num_generation_tokens))

    def on_prefix_cache_query(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries.append((queried_tokens, hit_tokens))

    def on_external_cache_query(self, queried_tokens: int, hit_tokens: int) -> None:
        self.external_queries.append((queried_tokens, hit_tokens))

    def on_prompt_tokens(self, local_compute: int, local_cache_hit: int, external_kv_transfer: int) -> None:
        self.prompt_sources.append((local_compute, local_cache_hit, external_kv_transfer))

    def on_preemption(self) -> None:
        self.preemptions += 1

    def on_lora_step(self, running: Sequence[str], waiting: Sequence[str], swaps: int) -> None:
        self.lora_steps.append((list(running), list(waiting), swaps))

    def on_lmcache_retrieve(self, requested_tokens: int, hit_tokens: int, seconds: float) -> None:
        self.lmcache_retrieves.append((requested_tokens, hit_tokens, seconds))

    def on_lmcache_store(self, stored_tokens: int, seconds: float) -> None:
        self.lmcache_stores.append((stored_tokens, seconds))

    def on_lmcache_usage(self, local_cpu_bytes: int) -> None:
        self.lmcache_cpu_bytes.append(local_cpu_bytes)

    def on_request_finished(self, stats: FinishedRequestStats) -> None:
        self.finished.append(stats)
        self.finished_event.set()


def work(prefill: Sequence[tuple[int, int]] = (), decodes: Sequence[int] = (), **extra: int) -> StepWork:
    """One engine step's work: prefill chunks as (tokens, context) and decodes by context."""
    w = StepWork(**extra)
    for n, ctx in prefill:
        w.add_prefill(n, ctx)
    for ctx in decodes:
        w.add_decode(ctx)
    return w
