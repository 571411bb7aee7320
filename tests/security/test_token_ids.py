"""Token ids no engine could hold are a 400 naming the field, from the router, under every policy.

A prompt sent as token ids is read by the router itself (the cache-aware policy hashes its blocks as
uint32), so an id below 0 or above 2**32-1 must be refused where the prompt is checked, before any
routing work: never a 500, never a retry, never a trip to an engine. Each case goes through the real
router in front of two real simulators, with the real ``openai`` client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from tests.conftest import free_port
from tests.router.conftest import FAST_MONITOR, MODEL, RouterServer, Sim

from kvstack.common.waits import wait_until
from kvstack.router.config import load_settings
from kvstack.router.policies import policy_names

HOSTILE: list[Any] = [[-1], [4294967296], [10**30], [[-5]], [[1, 2], [3, -7]], [5, 10**400]]
IDS = ["negative", "2**32", "10**30", "nested", "second-of-batch", "400-digits"]

# every policy; the cache-aware one also with the engines' own tokenizer
SETUPS = [{"policy": name} for name in policy_names()] + [{"policy": "cache_aware", "tokenizer": "engine"}]


@pytest.fixture(scope="module", params=SETUPS, ids=lambda s: "-".join(s.values()))
def server(request: pytest.FixtureRequest, sims: list[Sim]) -> Iterator[RouterServer]:
    settings = load_settings(
        port=free_port(),
        engines=[sim.url for sim in sims],
        monitor=FAST_MONITOR,
        access_log=False,
        **request.param,
    )
    r = RouterServer(settings).start()
    try:
        r.wait_available(len(sims))
        yield r
    finally:
        r.stop()


class Client(openai.OpenAI):
    """The SDK with its default retries on (a 5xx would be retried), counting what it sends."""

    def __init__(self, r: RouterServer) -> None:
        self.sent = 0
        http = openai.DefaultHttpxClient(timeout=30, event_hooks={"request": [self._count]})
        super().__init__(base_url=f"{r.url}/v1", api_key="unused", max_retries=2, http_client=http)

    def _count(self, request: object) -> None:
        self.sent += 1


def answered(r: RouterServer, status: int) -> float:
    """Requests the router answered with ``status`` without choosing an engine."""
    return r.metric("kvstack_router_requests_total", model_name="", engine="", status=str(status))


def assert_refused(r: RouterServer, c: Client, send: Callable[[], object], field: str) -> None:
    dispatches = "kvstack_router_dispatch_seconds_count"
    before, dispatched = answered(r, 400), r.metric(dispatches, policy=r.ctx.policy.name)
    with pytest.raises(openai.BadRequestError) as caught:
        send()
    assert c.sent == 1  # refused for good: the client did not retry it
    err = caught.value
    assert err.status_code == 400
    body = err.body
    assert isinstance(body, dict), body
    assert body["param"] == field and body["code"] == 400 and body["type"] == "BadRequestError"
    assert f"'{field}[" in body["message"] and "token ids are integers in 0..4294967295" in body["message"]
    assert len(body["message"]) < 200  # a 400-digit id is not echoed back
    # the router counts the request once its answer is sent: poll, it may lag the client by a moment
    wait_until(lambda: answered(r, 400) == before + 1, "the router to count the 400 it answered")
    # refused before routing: no engine was chosen, nothing was dispatched
    assert r.metric(dispatches, policy=r.ctx.policy.name) == dispatched


@pytest.mark.parametrize("prompt", HOSTILE, ids=IDS)
def test_completions(server: RouterServer, prompt: Any) -> None:
    c = Client(server)
    assert_refused(
        server, c, lambda: c.completions.create(model=MODEL, prompt=prompt, max_tokens=1), "prompt"
    )


@pytest.mark.parametrize("prompt", HOSTILE, ids=IDS)
def test_embeddings(server: RouterServer, prompt: Any) -> None:
    c = Client(server)
    assert_refused(server, c, lambda: c.embeddings.create(model=MODEL, input=prompt), "input")


@pytest.mark.parametrize("prompt", HOSTILE, ids=IDS)
def test_tokenize(server: RouterServer, prompt: Any) -> None:
    c, body = Client(server), {"model": MODEL, "prompt": prompt}
    assert_refused(server, c, lambda: c.post(f"{server.url}/tokenize", cast_to=object, body=body), "prompt")


def test_the_largest_token_id_is_left_to_the_engine(server: RouterServer) -> None:
    """2**32-1 fits the router's arrays: the engine, which knows its vocabulary, refuses it."""
    c = Client(server)
    with pytest.raises(openai.BadRequestError) as caught:
        c.completions.create(model=MODEL, prompt=[1, 4294967295], max_tokens=1)
    assert "out of vocabulary" in str(caught.value)
    done = c.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=1)  # the router serves on
    assert done.usage is not None and done.usage.prompt_tokens == 3
