"""Scale from zero: requests for a model with no engine are held (bounded, timed, counted in
``kvstack_router_queued_requests``) and released the moment an engine of the model comes up."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from kvstack.common.procs import ManagedProcess, free_port
from kvstack.common.waits import wait_until
from kvstack.router.hold import HoldFull, Holds, HoldTimeout

from .conftest import KVSTACK, MODEL, RouterFactory, RouterServer, run_sims

QUEUED = "kvstack_router_queued_requests"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "wake up"}], "max_tokens": 2}


class Background:
    """One request in a thread; ``result`` is the response or the exception it raised."""

    def __init__(self, url: str, body: dict[str, object], timeout: float = 60.0) -> None:
        self.result: httpx.Response | Exception | None = None
        self._thread = threading.Thread(target=self._run, args=(url, body, timeout), daemon=True)
        self._thread.start()

    def _run(self, url: str, body: dict[str, object], timeout: float) -> None:
        try:
            self.result = httpx.post(url, json=body, timeout=timeout)
        except Exception as err:
            self.result = err

    def join(self, timeout: float = 60.0) -> httpx.Response:
        self._thread.join(timeout)
        assert isinstance(self.result, httpx.Response), self.result
        return self.result


@pytest.fixture
def engines_file(tmp_path: Path) -> Path:
    path = tmp_path / "engines.yaml"
    path.write_text("[]\n")
    return path


@pytest.fixture(params=[True, False], ids=["in-flow-queue", "flow-off"])
def hold_router(
    router: RouterFactory, engines_file: Path, request: pytest.FixtureRequest
) -> Callable[..., RouterServer]:
    """A router holding MODEL with no engine: held in the flow queue, or (flow control off) in the hold."""

    def make(**values: object) -> RouterServer:
        values.setdefault("hold_models", [MODEL])
        values.setdefault("flow_control", {"enabled": request.param})
        return router(engines_file=engines_file, available=0, **values)

    return make


def queued(r: RouterServer) -> float | None:
    return r.ctx.metrics.registry.get_sample_value(QUEUED, {"model_name": MODEL})


def test_held_request_completes_once_an_engine_comes_up(
    hold_router: Callable[..., RouterServer], engines_file: Path, tmp_path: Path
) -> None:
    r = hold_router()
    assert queued(r) == 0.0  # exported before any request: the autoscaler can read it at once
    listed = httpx.get(f"{r.url}/v1/models", timeout=5).json()
    assert [m["id"] for m in listed["data"]] == [MODEL]
    held = Background(f"{r.url}/v1/chat/completions", BODY)
    wait_until(lambda: queued(r) == 1.0, "the request to be held", 10, 0.02)
    with run_sims(tmp_path, 1) as sims:
        engines_file.write_text(yaml.safe_dump([{"url": sims[0].url}]))  # models learnt from the engine
        resp = held.join()
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"]
        assert queued(r) == 0.0
        assert (
            r.metric("kvstack_router_requests_total", model_name=MODEL, engine=sims[0].url, status="200") == 1
        )


def test_hold_timeout_answers_503_with_retry_after(hold_router: Callable[..., RouterServer]) -> None:
    r = hold_router(hold_timeout_s=0.3)
    resp = httpx.post(f"{r.url}/v1/chat/completions", json=BODY, timeout=10)
    assert resp.status_code == 503
    assert int(resp.headers["retry-after"]) >= 1
    assert resp.json()["error"]["code"] == 503
    assert r.metric("kvstack_router_rejections_total", reason="hold_timeout") == 1
    assert queued(r) == 0.0


def test_a_held_request_waits_out_an_engine_that_is_announced_before_it_listens(
    hold_router: Callable[..., RouterServer], engines_file: Path, tmp_path: Path
) -> None:
    # A pod whose readiness came before its server (a missing or too-early readiness probe): the
    # user asked for a slow start, not an error, and there is hold time left.
    r = hold_router(hold_timeout_s=60, monitor={"probe_interval": 0.2, "probe_timeout": 2.0})
    held = Background(f"{r.url}/v1/chat/completions", BODY)
    wait_until(lambda: queued(r) == 1.0, "the request to be held", 10, 0.02)
    port = free_port()
    engines_file.write_text(yaml.safe_dump([{"url": f"http://127.0.0.1:{port}", "models": [MODEL]}]))
    wait_until(lambda: len(r.ctx.registry) == 1, "the engine to be announced", 10, 0.02)
    argv = [KVSTACK, "engine", "sim", "--port", str(port)]
    sim = ManagedProcess(f"sim-{port}", argv, tmp_path, ready_url=f"http://127.0.0.1:{port}/health")
    try:
        sim.start().wait_ready(30)
        resp = held.join()
        assert resp.status_code == 200, resp.text
    finally:
        sim.stop()


def test_an_sdk_client_sees_a_service_unavailable_error_after_the_hold(
    hold_router: Callable[..., RouterServer],
) -> None:
    r = hold_router(hold_timeout_s=0.3)
    client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0, timeout=10)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    err = caught.value
    assert err.status_code == 503
    assert err.body == {
        "message": f"no engine for {MODEL} became available within 0.3 s; try again",
        "type": "ServiceUnavailableError",
        "param": None,
        "code": 503,
    }
    # The SDK's own retries would honour this (its default is two retries, capped at 60 s).
    assert float(err.response.headers["retry-after"]) >= 1


def test_over_the_bound_answers_429(hold_router: Callable[..., RouterServer]) -> None:
    r = hold_router(max_held_per_model=1, hold_timeout_s=3)
    first = Background(f"{r.url}/v1/chat/completions", BODY)
    wait_until(lambda: queued(r) == 1.0, "the first request to be held", 10, 0.02)
    resp = httpx.post(f"{r.url}/v1/chat/completions", json=BODY, timeout=10)
    assert resp.status_code == 429
    assert "retry-after" in resp.headers
    assert r.metric("kvstack_router_rejections_total", reason="hold_full") == 1
    assert queued(r) == 1.0  # the refused request never counted
    assert first.join().status_code == 503


def test_client_that_disconnects_while_held_leaves_the_queue(
    hold_router: Callable[..., RouterServer],
) -> None:
    r = hold_router()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{r.url}/v1/chat/completions", json=BODY, timeout=httpx.Timeout(5, read=0.5))
    wait_until(
        lambda: queued(r) == 0.0 and r.ctx.holds.held(MODEL) == 0, "the held request to leave", 10, 0.02
    )
    assert r.metric("kvstack_router_client_disconnects_total", model_name=MODEL) == 1


def test_unheld_and_unknown_models_still_fail_at_once(router: RouterFactory, engines_file: Path) -> None:
    r = router(engines_file=engines_file, available=0, hold_models=["*"])
    # "*" holds models some engine served; this one never was
    resp = httpx.post(f"{r.url}/v1/chat/completions", json=BODY, timeout=10)
    assert resp.status_code == 404
    assert r.ctx.holds.held(MODEL) == 0


def test_admission_waiters_start_when_an_engine_is_added(
    router: RouterFactory, engines_file: Path, tmp_path: Path
) -> None:
    with run_sims(tmp_path, 2, "--speed", "0.1") as sims:
        engines_file.write_text(yaml.safe_dump([{"url": sims[0].url, "name": "a"}]))
        r = router(
            engines_file=engines_file,
            available=1,
            max_in_flight_per_engine=1,
            queue_timeout_s=60,
            expose_engine_header=True,
            # patient probes: a busy machine must not take either engine out during the test
            monitor={
                "probe_interval": 0.2,
                "probe_timeout": 3.0,
                "scrape_interval": 0.5,
                "models_interval": 5.0,
            },
        )
        long = Background(f"{r.url}/v1/chat/completions", {**BODY, "max_tokens": 150})
        wait_until(lambda: r.ctx.registry.all()[0].in_flight == 1, "the first request to start", 10, 0.02)
        waiting = Background(f"{r.url}/v1/chat/completions", BODY)
        wait_until(lambda: queued(r) == 1.0, "the second request to queue", 10, 0.02)
        engines_file.write_text(
            yaml.safe_dump([{"url": sims[0].url, "name": "a"}, {"url": sims[1].url, "name": "b"}])
        )
        resp = waiting.join()
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-kvstack-engine"] == "b"
        assert long.result is None  # admitted by the new engine, not by the first request ending
        assert long.join().status_code == 200


# ---------------------------------------------------------------- the pure parts


@pytest.mark.parametrize(
    ("configured", "seen", "model", "held"),
    [
        ([], {"m"}, "m", False),
        (["m"], set(), "m", True),
        (["m"], set(), "other", False),
        (["*"], {"m"}, "m", True),
        (["*"], set(), "m", False),  # never served: unknown, so 404
        (["*", "n"], set(), "n", True),
    ],
)
def test_which_models_are_held(configured: list[str], seen: set[str], model: str, held: bool) -> None:
    holds = Holds(configured, 10)
    holds.see(seen)
    assert holds.holds(model) is held
    assert (model in holds.models()) is held


def test_holds_bound_timeout_and_wake() -> None:
    async def scenario() -> None:
        holds = Holds(["m"], 1)
        with pytest.raises(HoldTimeout):
            await holds.wait("m", 0.01)
        assert holds.held("m") == 0
        waiter = asyncio.create_task(holds.wait("m", 5))
        await asyncio.sleep(0)
        with pytest.raises(HoldFull):
            await holds.wait("m", 5)
        assert holds.wake("m") == 1
        await waiter
        assert holds.held("m") == 0

    asyncio.run(scenario())


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = threading.active_count()
    yield
    wait_until(lambda: threading.active_count() <= before, "request threads to end", 20, 0.02)
