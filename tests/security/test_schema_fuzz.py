"""Schemathesis against the router's own schema (``/openapi.json``): generated valid and invalid
requests for every route get no 5xx, and every response matches the schema (status codes and
OpenAI-shaped error bodies).

The schema is fetched from the running router; the test only narrows a few request fields
(``narrowed``) so valid requests name the simulator's model and stay short.
Needs ``schemathesis`` (dev extra); the test is skipped without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tests.router.conftest import MODEL, RouterServer, router_factory, run_sims

from kvstack.router.app import PROXIED

# request fields the test bounds: one model, short generations, token ids the simulator knows
_NARROW: dict[str, dict[str, Any]] = {
    "model": {"type": "string", "enum": [MODEL]},
    "max_tokens": {"type": "integer", "minimum": 0, "maximum": 4},
    "max_completion_tokens": {"type": "integer", "minimum": 0, "maximum": 4},
    "n": {"type": "integer", "minimum": 1, "maximum": 1},
}
_TOKEN = {"type": "integer", "minimum": 0, "maximum": 1000}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterServer]:
    # short generations: a fuzzed request may ask for up to max-model-len tokens
    flags = ("--speed", "100", "--max-model-len", "512")
    with run_sims(tmp_path_factory.mktemp("fuzz"), 1, *flags) as (sim,), router_factory(RouterServer) as make:
        yield make(engines=[sim.url])


def fetched_schema(r: RouterServer) -> dict[str, Any]:
    resp = httpx.get(f"{r.url}/openapi.json")
    assert resp.status_code == 200
    schema: dict[str, Any] = resp.json()
    return schema


def _narrow_tokens(node: Any) -> None:
    """Bound the items of every integer array (token ids) in a request body schema."""
    if isinstance(node, dict):
        items = node.get("items")
        if isinstance(items, dict) and items.get("type") == "integer":
            node["items"] = dict(_TOKEN)
        for value in node.values():
            _narrow_tokens(value)
    elif isinstance(node, list):
        for value in node:
            _narrow_tokens(value)


def narrowed(schema: dict[str, Any]) -> dict[str, Any]:
    """The router's schema with the request fields in ``_NARROW`` bounded (in place)."""
    for item in schema["paths"].values():
        for operation in item.values():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body is None:
                continue
            props = body["schema"]["properties"]
            props.update({k: v for k, v in _NARROW.items() if k in props})
            _narrow_tokens(body["schema"])
    return schema


def test_the_router_publishes_its_openapi_schema(served: RouterServer) -> None:
    """A client (or schemathesis) can fetch the router's schema, and it describes the OpenAI routes
    with OpenAI-shaped errors; FastAPI's 422 is documented as the 400 the router sends."""
    schema = fetched_schema(served)
    paths = schema["paths"]
    assert {path for path, _ in PROXIED} <= set(paths)
    chat = paths["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["required"] == ["model", "messages"]
    assert {"200", "400", "401", "404", "408", "413", "429", "502", "503", "504"} <= set(chat["responses"])
    error_ref = {"$ref": "#/components/schemas/OpenAIError"}
    assert chat["responses"]["429"]["content"]["application/json"]["schema"] == error_ref
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    engines = paths["/router/engines"]["get"]["responses"]
    assert "422" not in engines
    assert engines["400"]["content"]["application/json"]["schema"] == error_ref
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert "/openapi.json" not in paths and "/docs" not in paths


def test_a_validation_error_matches_the_documented_400(served: RouterServer) -> None:
    resp = httpx.get(f"{served.url}/router/engines", params={"available": "maybe"})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == ("available", 400)


def test_an_engine_error_reaches_the_client_in_the_openai_shape(served: RouterServer) -> None:
    """The simulator serves no embeddings: the client still gets an OpenAI-shaped 404."""
    resp = httpx.post(f"{served.url}/v1/embeddings", json={"model": MODEL, "input": "x"})
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == 404


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_requests_get_no_5xx_and_match_the_schema(served: RouterServer, mode: str) -> None:
    """Every generated request (valid, or violating the schema in some field) gets a documented
    status with a body matching the schema, never a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    hypothesis = pytest.importorskip("hypothesis")
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

    schema = schemathesis.openapi.from_dict(narrowed(fetched_schema(served)))
    generation = schemathesis.GenerationMode(mode)
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    tested = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode == "negative" and operation.method.upper() == "GET" and not operation.query:
            continue  # nothing to violate

        @hypothesis.settings(
            max_examples=40,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        @hypothesis.given(case=operation.as_strategy(generation_mode=generation))
        def check(case: Any) -> None:
            case.call_and_validate(base_url=served.url, checks=checks, timeout=30)

        check()
        tested += 1
    assert tested >= 6
