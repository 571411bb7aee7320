"""A client that goes away aborts its request in the core: blocks freed, counted as ``abort``."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import httpx
import pytest
from tests.engine_sim_server.conftest import MODEL, Sim, run_sim
from tests.engine_sim_server.promtext import sample

from kvstack.common.waits import wait_until

LONG = {"model": MODEL, "prompt": "A long answer, please. " * 20, "max_tokens": 1500, "ignore_eos": True}


@pytest.fixture(scope="module")
def slow_sim() -> Iterator[Sim]:
    # Real time: 1500 tokens take several seconds, so the client leaves mid-request.
    with run_sim("--speed", "1", "--num-gpu-blocks", "500", "--max-model-len", "4096") as s:
        yield s


def wait_for(check: Callable[[], bool], timeout: float = 15.0) -> None:
    wait_until(check, "the simulator to notice", timeout=timeout, interval=0.05)


def value(sim: Sim, name: str, **labels: str) -> float:
    return sample(sim.metrics(), name, **labels)


def test_stream_closed_mid_way_aborts(slow_sim: Sim) -> None:
    before = value(slow_sim, "vllm:request_success_total", finished_reason="abort")
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{slow_sim.base_url}/completions", json={**LONG, "stream": True}) as r,
    ):
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert '"text_completion"' in first
        assert value(slow_sim, "vllm:num_requests_running") == 1
        assert value(slow_sim, "vllm:kv_cache_usage_perc") > 0
    # Leaving both blocks closes the connection with most of the answer unsent.
    wait_for(lambda: value(slow_sim, "vllm:request_success_total", finished_reason="abort") == before + 1)
    assert value(slow_sim, "vllm:num_requests_running") == 0
    assert value(slow_sim, "vllm:kv_cache_usage_perc") == 0


def test_non_streaming_client_gone_before_reply_aborts(slow_sim: Sim) -> None:
    before = value(slow_sim, "vllm:request_success_total", finished_reason="abort")
    import json

    body = json.dumps(LONG).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", slow_sim.port)) as conn:
        conn.sendall(head + body)
        wait_for(lambda: value(slow_sim, "vllm:num_requests_running") == 1)
    wait_for(lambda: value(slow_sim, "vllm:request_success_total", finished_reason="abort") == before + 1)
    assert value(slow_sim, "vllm:num_requests_running") == 0
    assert value(slow_sim, "vllm:kv_cache_usage_perc") == 0
    assert value(slow_sim, "vllm:request_success_total", finished_reason="length") == 0
