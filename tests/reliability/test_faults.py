"""Faults the stack must survive, as a client sees them (see README.md for where the others live)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from tests.conftest import free_port
from tests.router.conftest import MODEL, BadEngine, RouterFactory, Sim, run_sims

from kvstack.common.procs import running

from .conftest import Redis, router_process

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_a_hanging_engine_gets_504_and_gives_its_admission_slot_back(router: RouterFactory) -> None:
    """The user sees a 504 after the first-byte timeout, and the next request is admitted, not 429.

    With one slot per engine and no queue, a slot the router failed to free would turn every later
    request into a 429 ``queue_full``.
    """
    with BadEngine("hang") as bad:
        r = router(
            engines=[bad.url],
            first_byte_timeout_s=0.3,
            max_in_flight_per_engine=1,
            max_queue_per_model=0,
            eject_after_failures=10,
        )
        for _ in range(3):
            resp = httpx.post(f"{r.url}/v1/chat/completions", json=CHAT, timeout=10)
            assert resp.status_code == 504, resp.text
            assert resp.json()["error"]["type"] == "GatewayTimeoutError"
        assert r.ctx.registry.all()[0].in_flight == 0
        assert r.ctx.queues[MODEL].active == 0
        assert r.metric("kvstack_router_rejections_total", reason="queue_full") == 0
        assert bad.posts == 3


def _client_load(
    url: str, stop: threading.Event, outcomes: dict[str, int], lock: threading.Lock, stream: bool
) -> None:
    """Send requests until ``stop``; each ends as ok or an explicit error, retried by the SDK."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=6, timeout=30)
    while not stop.is_set():
        try:
            if stream:
                chunks = client.chat.completions.create(
                    model=MODEL, messages=CHAT["messages"], max_tokens=20, stream=True
                )
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                outcome = "ok" if text else "empty"
            else:
                reply = client.completions.create(model=MODEL, prompt="restart", max_tokens=20)
                outcome = "ok" if reply.choices[0].text else "empty"
        except openai.APITimeoutError:
            outcome = "timeout"  # a silent drop: the client waited for nothing
        except openai.APIError as err:
            outcome = f"error: {type(err).__name__}"
        with lock:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1


@pytest.mark.slow
def test_router_restart_under_load_drops_no_request(tmp_path: Path) -> None:
    """Clients that retry all succeed across a router restart (SIGTERM, then a new process on the
    same port): requests in flight at the SIGTERM finish, new ones are refused (and retried), and
    every request the engines finished reached its client."""
    with run_sims(tmp_path, 2, "--speed", "0.3") as engines:
        port = free_port()
        urls = [s.url for s in engines]
        url = f"http://127.0.0.1:{port}"
        outcomes: dict[str, int] = {}
        lock, stop = threading.Lock(), threading.Event()
        first = router_process(tmp_path, port, urls)
        second = router_process(tmp_path / "second", port, urls)
        clients = [
            threading.Thread(target=_client_load, args=(url, stop, outcomes, lock, i % 2 == 0))
            for i in range(6)
        ]
        with running([first]):
            for t in clients:
                t.start()
            time.sleep(2.0)
            in_flight = sum(s.metric("vllm:num_requests_running") for s in engines)
            first.stop(timeout=30)  # graceful: uvicorn drains what it accepted
        assert in_flight > 0, "the restart must happen under load"
        with running([second]):
            time.sleep(2.0)
            stop.set()
            for t in clients:
                t.join(60)
        served = sum(s.metric("vllm:request_success_total") for s in engines)
    assert not any(t.is_alive() for t in clients), "a client hung"
    assert set(outcomes) == {"ok"}, outcomes
    # Every request the engines finished (none aborted by a dropped connection) reached a client.
    assert served == outcomes["ok"]
    assert outcomes["ok"] >= 12


def _external_hits(sim: Sim) -> float:
    return sim.metric("vllm:external_prefix_cache_hits_total")


def _wait(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


@pytest.mark.slow
def test_shared_cache_outage_recomputes_then_sharing_resumes(
    tmp_path: Path, redis: Redis, router: RouterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two simulated engines share KV through Redis behind the router. With Redis killed every
    request still succeeds (recomputed, no external hits); once Redis is back, a prompt the first
    engine computed is again read by the second one from Redis."""
    monkeypatch.setenv("PYTHONHASHSEED", "0")  # LMCache's chunk keys agree only under one seed
    flags = ["--lmcache", "--lmcache-remote-url", redis.url, "--lmcache-chunk-size", "64"]
    with run_sims(tmp_path, 2, *flags) as (a, b):
        # round robin over [a, b]: each prompt is computed on a, then asked of b
        r = router(engines=[a.url, b.url], policy="round_robin")
        client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="x", max_retries=0, timeout=30)

        def share(topic: str) -> float:
            """b's external-hit tokens gained from a prompt a computed first."""
            prompt = f"{topic}: " + " ".join(f"word{i}" for i in range(400))
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)  # on a, stored
            time.sleep(0.5)  # the store to Redis is asynchronous
            before = _external_hits(b)
            assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=1).choices  # on b
            return _external_hits(b) - before

        assert share("before") > 0, "no sharing to begin with: the test would prove nothing"
        redis.kill()
        for i in range(3):
            assert share(f"down {i}") == 0
        redis.start()  # empty, same port
        _wait(lambda: share(f"back {time.monotonic()}") > 0, timeout=20)
        assert r.metric("kvstack_router_upstream_errors_total", engine=a.url, kind="connect") == 0
