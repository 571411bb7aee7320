"""Faults the stack must survive, as a client sees them (see README.md for where the others live)."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from tests.conftest import free_port
from tests.router.conftest import MODEL, BadEngine, RouterFactory, Sim, run_sims

from kvstack.common.procs import running
from kvstack.common.waits import wait_until

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
            flow_control={"models": [{"max_queue": 0}]},
            eject_after_failures=10,
        )
        for _ in range(3):
            resp = httpx.post(f"{r.url}/v1/chat/completions", json=CHAT, timeout=10)
            assert resp.status_code == 504, resp.text
            assert resp.json()["error"]["type"] == "GatewayTimeoutError"
        assert r.ctx.registry.all()[0].in_flight == 0
        assert r.ctx.flow.reserved.get(MODEL, 0) == 0 and not r.ctx.flow.queues[MODEL]
        assert r.metric("kvstack_router_rejections_total", reason="queue_full") == 0
        assert bad.posts == 3


@dataclass
class _Outcome:
    stream: bool
    engine: str = ""  # from the answer's head (x-kvstack-engine)
    result: str = "pending"  # ok | error: <type> | timeout


def _call(client: openai.OpenAI, stream: bool, out: _Outcome) -> None:
    """One chat request, recording which engine answered and how it ended."""
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=CHAT["messages"], max_tokens=150, stream=stream
        )
        out.engine = raw.headers.get("x-kvstack-engine", "")
        answer = raw.parse()
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices)  # type: ignore[union-attr]
        else:
            text = answer.choices[0].message.content or ""  # type: ignore[union-attr]
        out.result = "ok" if text else "error: empty answer"
    except (openai.APITimeoutError, httpx.TimeoutException):
        out.result = "timeout"
    except (openai.APIError, httpx.TransportError) as err:
        out.result = f"error: {type(err).__name__}"


def test_a_stopped_engine_ends_its_requests_and_those_without_a_token_go_elsewhere(
    tmp_path: Path, router: RouterFactory
) -> None:
    """An engine frozen by SIGSTOP keeps its connections open and sends nothing. Once the monitor
    declares it down, its streams that had sent tokens end with an error event, and its requests
    that had none (streams still queued there, plain requests) are answered by the other engine.
    Nobody waits for the idle (300 s) or first-byte (600 s) timeouts, left at their defaults."""
    with (
        run_sims(tmp_path / "a", 1, "--speed", "0.1", "--max-num-seqs", "2") as (frozen,),
        run_sims(tmp_path / "b", 1, "--speed", "0.1") as (other,),
    ):
        # flow control off: with it the router would keep the requests itself once the engine is
        # full, and this test is about requests queued inside an engine that stops
        r = router(
            engines=[frozen.url, other.url],
            policy="round_robin",
            expose_engine_header=True,
            flow_control={"enabled": False},
        )
        client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="x", max_retries=0, timeout=120)
        streams = [_Outcome(stream=True) for _ in range(10)]
        plain = [_Outcome(stream=False) for _ in range(2)]
        threads = [threading.Thread(target=_call, args=(client, o.stream, o)) for o in streams]
        for t in threads:
            t.start()
        # two streams under way on it (their tokens reached the client), three queued behind them
        wait_until(lambda: sum(o.engine == frozen.url for o in streams) == 2, "streams under way", 60, 0.05)
        # the two plain requests: round robin sends one to each engine, there queued behind the streams
        threads += [threading.Thread(target=_call, args=(client, o.stream, o)) for o in plain]
        for t in threads[-2:]:
            t.start()
        wait_until(lambda: frozen.metric("vllm:num_requests_waiting") >= 4, "requests queued", 60, 0.05)
        _join_while_stopped(frozen.proc.pid, threads)
    assert not any(t.is_alive() for t in threads), "a request hung"
    outcomes = streams + plain
    started_there = [o for o in outcomes if o.engine == frozen.url]
    assert len(started_there) == 2 and all(o.result == "error: APIError" for o in started_there), outcomes
    rest = [o for o in outcomes if o.engine != frozen.url]
    assert all(o.result == "ok" and o.engine == other.url for o in rest), outcomes
    assert r.metric("kvstack_router_retries_total", model_name=MODEL, reason="engine_lost") >= 1
    assert all(e.in_flight == 0 for e in r.ctx.registry.all())


def test_a_stopped_engine_with_no_other_answers_504_in_the_openai_shape(
    tmp_path: Path, router: RouterFactory
) -> None:
    """The only engine is frozen (SIGSTOP): once the monitor declares it down, its stream under way
    ends with an error event and a request it had not answered gets a 504 in the OpenAI shape."""
    with run_sims(tmp_path, 1, "--speed", "0.1", "--max-num-seqs", "1") as (frozen,):
        r = router(engines=[frozen.url], expose_engine_header=True)
        client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="x", max_retries=0, timeout=120)
        stream = _Outcome(stream=True)
        threads = [threading.Thread(target=_call, args=(client, True, stream))]
        threads[0].start()
        wait_until(lambda: stream.engine, "the stream under way", 60, 0.05)
        plain: list[httpx.Response] = []
        body = {**CHAT, "max_tokens": 150}

        def post() -> None:
            plain.append(httpx.post(f"{r.url}/v1/chat/completions", json=body, timeout=120))

        threads.append(threading.Thread(target=post))
        threads[1].start()
        wait_until(lambda: frozen.metric("vllm:num_requests_waiting") >= 1, "the request queued", 60, 0.05)
        _join_while_stopped(frozen.proc.pid, threads)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert stream.result == "error: APIError"
    (resp,) = plain
    assert resp.status_code == 504
    assert resp.json()["error"]["type"] == "GatewayTimeoutError"
    assert "stopped responding" in resp.json()["error"]["message"]


def test_an_engine_that_passes_health_checks_but_fails_every_request_is_ejected(
    sims: list[Sim], router: RouterFactory
) -> None:
    """``/health`` answers 200, every request 500. Users see no failure: a 500 with nothing sent yet
    is retried on another engine. Three in a row eject the engine; its good probes do not bring it
    back; back after its ejection, its first failure ejects it again, for twice as long."""
    with BadEngine("status:500") as bad:
        r = router(engines=[bad.url, sims[0].url, sims[1].url], policy="round_robin", eject_duration_s=2.0)
        client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="x", max_retries=0, timeout=30)
        state = r.ctx.registry.get(bad.url)
        assert state is not None
        answers = 0

        def ask() -> None:
            """One request (plain and streamed in turn); it must succeed."""
            nonlocal answers
            stream = answers % 2 == 1
            reply = client.chat.completions.create(
                model=MODEL, messages=CHAT["messages"], max_tokens=3, stream=stream
            )
            answers += 1
            if stream:
                assert "".join(c.choices[0].delta.content or "" for c in reply if c.choices)  # type: ignore[union-attr]
            else:
                assert reply.choices[0].message.content  # type: ignore[union-attr]

        wait_until(lambda: ask() or state.outlier.ejections, "the first ejection", timeout=60, interval=0)
        assert bad.posts == 3
        first_until = state.ejected_until
        probes = bad.probes
        wait_until(
            lambda: bad.probes >= probes + 3, "good probes during the ejection", timeout=30, interval=0.05
        )
        wait_until(lambda: ask() or bad.posts > 3, "a request on it again", timeout=60, interval=0)
        assert bad.post_times[3] >= first_until  # it got requests again only once its time was over
        assert bad.posts == 4 and state.outlier.ejections == 2  # one failure: out again, for longer
    assert r.metric("kvstack_router_engine_ejections_total", engine=bad.url) == 2
    assert r.metric("kvstack_router_retries_total", model_name=MODEL, reason="500") == 4


def test_an_engine_that_fails_every_other_request_is_ejected_on_its_failure_rate(
    sims: list[Sim], router: RouterFactory
) -> None:
    """Half its answers are 500, so it never fails three in a row: its failure rate over the window
    ejects it. Users see no failure meanwhile (each 500 is retried on another engine)."""
    with BadEngine("flaky:500") as bad:
        r = router(engines=[bad.url, sims[0].url], policy="round_robin", eject_min_requests=6)
        client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="x", max_retries=0, timeout=30)
        state = r.ctx.registry.get(bad.url)
        assert state is not None

        def ask() -> None:
            reply = client.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=3)
            assert reply.choices[0].message.content

        wait_until(lambda: ask() or state.outlier.ejections, "an ejection", timeout=60, interval=0)
        # failed, answered, ... failed: 4 of 7 (at least 6 seen, half failed), never 2 in a row
        assert bad.posts == 7 and state.outlier.consecutive == 1
    assert r.metric("kvstack_router_retries_total", model_name=MODEL, reason="500") == 4


def _attempt(client: openai.OpenAI, stream: bool) -> str:
    """One try: ``ok``, ``timeout`` (a silent drop: the client waited for nothing) or ``error: ...``."""
    try:
        if stream:
            chunks = client.chat.completions.create(
                model=MODEL, messages=CHAT["messages"], max_tokens=20, stream=True
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            text = client.completions.create(model=MODEL, prompt="restart", max_tokens=20).choices[0].text
        return "ok" if text else "error: empty answer"
    except (openai.APITimeoutError, httpx.TimeoutException):
        return "timeout"
    except (openai.APIError, httpx.TransportError) as err:
        return f"error: {type(err).__name__}"


def _client_load(url: str, stop: threading.Event, tries: list[str], done: list[bool], stream: bool) -> None:
    """Send requests until ``stop``; retry each after an explicit error (up to 20 tries, backing off)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
    while not stop.is_set():
        for attempt in range(20):
            outcome = _attempt(client, stream)
            tries.append(outcome)  # list.append is atomic: threads share the lists
            if outcome in ("ok", "timeout"):
                break
            time.sleep(min(1.0, 0.05 * 2**attempt))
        done.append(outcome == "ok")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["graceful", "crash"])
def test_router_restart_under_load_drops_no_request(tmp_path: Path, how: str) -> None:
    """Clients that retry all succeed across a router restart (SIGTERM, or SIGKILL, then a new
    process on the same port): every try either completes or gets an explicit error (refused
    connection, reset, 5xx); none waits for nothing. After a graceful stop, requests in flight
    finish: every request the engines finished reached its client."""
    with run_sims(tmp_path, 2, "--speed", "0.3") as engines:
        port = free_port()
        urls = [s.url for s in engines]
        url = f"http://127.0.0.1:{port}"
        tries: list[str] = []
        done: list[bool] = []
        stop = threading.Event()
        first = router_process(tmp_path, port, urls)
        second = router_process(tmp_path / "second", port, urls)
        clients = [
            threading.Thread(target=_client_load, args=(url, stop, tries, done, i % 2 == 0)) for i in range(6)
        ]
        with running([first]):
            for t in clients:
                t.start()
            time.sleep(2.0)
            in_flight = sum(s.metric("vllm:num_requests_running") for s in engines)
            if how == "graceful":
                first.stop(timeout=30)  # uvicorn drains what it accepted
            else:
                os.killpg(first.pid, signal.SIGKILL)
                assert first.proc is not None and first.proc.wait(10) == -signal.SIGKILL
        assert in_flight > 0, "the restart must happen under load"
        with running([second]):
            time.sleep(2.0)
            stop.set()
            for t in clients:
                t.join(60)
        finished = sum(s.metric("vllm:request_success_total") for s in engines)
        aborted = sum(s.metric("vllm:request_success_total", finished_reason="abort") for s in engines)
    assert not any(t.is_alive() for t in clients), "a client hung"
    assert "timeout" not in tries
    assert all(done) and len(done) >= 12, (done, tries)
    if how == "graceful":
        assert aborted == 0 and finished == tries.count("ok") == len(done)
        assert set(tries) <= {"ok", "error: APIConnectionError"}


def _external_hits(sim: Sim) -> float:
    return sim.metric("vllm:external_prefix_cache_hits_total")


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
        wait_until(lambda: share(f"back {time.monotonic()}") > 0, "sharing through Redis again", 20, 0.1)
        assert r.metric("kvstack_router_upstream_errors_total", engine=a.url, kind="connect") == 0


def _join_while_stopped(pid: int, threads: list[threading.Thread]) -> None:
    """SIGSTOP the engine's process group, wait for the clients' threads, and always SIGCONT it."""
    os.killpg(pid, signal.SIGSTOP)
    try:
        for t in threads:
            t.join(110)
    finally:
        os.killpg(pid, signal.SIGCONT)


@pytest.mark.slow
def test_a_starting_router_answers_its_first_request_without_a_503(tmp_path: Path) -> None:
    """A router serves its port only once its engines' first probe is in: a client that retries
    connection errors while it starts (as in a restart) gets 200 from the first answer on, never
    503 "still learning which models its engines serve"."""
    with run_sims(tmp_path, 2) as engines:
        port = free_port()
        proc = router_process(tmp_path, port, [s.url for s in engines]).start()
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                deadline = time.monotonic() + 30
                while True:
                    assert proc.alive and time.monotonic() < deadline, proc.tail()
                    try:
                        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
                        resp = client.post("/v1/completions", json=body)
                    except httpx.TransportError:
                        continue  # not listening yet: refused, as in any restart
                    break
            assert resp.status_code == 200, resp.text
        finally:
            proc.stop()
