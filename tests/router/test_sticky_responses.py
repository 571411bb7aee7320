"""Stored /v1/responses through the router (router/sticky.py, router/response_routes.py): retrieve,
cancel and previous_response_id reach the engine that stored the response, learnt from its
answer, whole or streamed; an id the router never saw is vLLM's 404. Two real simulators with
vLLM's response store on, round-robin routing (so a follow-up sent anywhere would miss half the
time), and the openai SDK."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from .conftest import MODEL, RouterFactory, RouterServer, Sim, run_sims

STORE_ON = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}


@pytest.fixture(scope="module")
def store_sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Sim]]:
    with run_sims(tmp_path_factory.mktemp("store-sims"), 2, "--speed", "20", env=STORE_ON) as sims:
        yield sims


def _router(router: RouterFactory, sims: list[Sim], **extra: object) -> RouterServer:
    engines = [s.url for s in sims]
    return router(engines=engines, policy="round_robin", expose_engine_header=True, **extra)


def _client(r: RouterServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_retrieve_and_cancel_reach_the_engine_that_stored_the_response(
    store_sims: list[Sim], router: RouterFactory
) -> None:
    r = _router(router, store_sims)
    client = _client(r)
    made: dict[str, str] = {}  # response id -> the engine that answered it
    for i in range(4):
        raw = client.responses.with_raw_response.create(model=MODEL, input=f"turn {i}", max_output_tokens=3)
        made[raw.parse().id] = raw.headers["x-kvstack-engine"]
    assert len(set(made.values())) == 2  # both engines hold some
    for rid, engine in made.items():
        raw_got = client.responses.with_raw_response.retrieve(rid)
        assert raw_got.parse().id == rid and raw_got.headers["x-kvstack-engine"] == engine
        with pytest.raises(openai.BadRequestError) as refused:  # found there: only a finished one
            client.responses.cancel(rid)
        assert "Cannot cancel a synchronous response." in str(refused.value)


def test_a_streamed_response_is_learnt_from_its_created_event(
    store_sims: list[Sim], router: RouterFactory
) -> None:
    r = _router(router, store_sims)
    client = _client(r)
    for i in range(2):  # one on each engine
        with client.responses.create(model=MODEL, input=f"stream {i}", max_output_tokens=3, stream=True) as s:
            events = list(s)
        final = events[-1].response  # type: ignore[union-attr]
        assert client.responses.retrieve(final.id).output_text == final.output_text


def test_previous_response_id_goes_to_the_engine_holding_it(
    store_sims: list[Sim], router: RouterFactory
) -> None:
    r = _router(router, store_sims)
    client = _client(r)
    first = client.responses.with_raw_response.create(model=MODEL, input="hello", max_output_tokens=2)
    home, previous = first.headers["x-kvstack-engine"], first.parse().id
    for i in range(4):  # round robin would send every other one elsewhere, where it is unknown
        raw = client.responses.with_raw_response.create(
            model=MODEL, input=f"and then {i}", previous_response_id=previous, max_output_tokens=2
        )
        assert raw.headers["x-kvstack-engine"] == home
        previous = raw.parse().id
        assert raw.parse().previous_response_id is not None


def test_an_unknown_id_is_vllms_404(store_sims: list[Sim], router: RouterFactory) -> None:
    client = _client(_router(router, store_sims))
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.retrieve("resp_never_made")
    assert unknown.value.body["message"] == "Response with id 'resp_never_made' not found."  # type: ignore[index]
    assert unknown.value.body["code"] == 404  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_never_made")
    # a previous_response_id the router does not know is routed as any request: the engine's 404
    with pytest.raises(openai.NotFoundError) as previous:
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_elsewhere")
    assert "Response with id 'resp_elsewhere' not found." in str(previous.value)


def test_with_no_room_to_remember_follow_ups_are_not_routed(
    store_sims: list[Sim], router: RouterFactory
) -> None:
    r = _router(router, store_sims, sticky_responses={"max_entries": 0})
    client = _client(r)
    made = client.responses.create(model=MODEL, input="forgotten", max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)


def test_the_routes_take_the_api_key_and_are_counted(store_sims: list[Sim], router: RouterFactory) -> None:
    r = _router(router, store_sims, api_keys=["sk-good"])
    good = openai.OpenAI(base_url=f"{r.url}/v1", api_key="sk-good", max_retries=0, timeout=60)
    bad = openai.OpenAI(base_url=f"{r.url}/v1", api_key="sk-bad", max_retries=0, timeout=60)
    made = good.responses.create(model=MODEL, input="keyed", max_output_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        bad.responses.retrieve(made.id)
    with pytest.raises(openai.AuthenticationError):
        bad.responses.cancel(made.id)
    assert good.responses.retrieve(made.id).id == made.id
    route = "/v1/responses/{response_id}"
    assert r.metric("kvstack_router_route_requests_total", route=route, status="401") == 1
    assert r.metric("kvstack_router_route_requests_total", route=route, status="200") == 1
    assert r.metric("kvstack_router_route_requests_total", route=route + "/cancel", status="401") == 1
