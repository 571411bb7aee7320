"""Schemathesis against the router: generated valid and invalid requests for every route get no 5xx,
and every response matches the schema (status codes and OpenAI-shaped error bodies).

The router serves no ``/openapi.json`` and FastAPI's schema of it holds only the admin routes, so the
proxied OpenAI routes are described here (``PROXIED``): the fields the router reads and the errors it
answers with (``/v1/embeddings`` aside: the simulator serves none, see its xfail); FastAPI's 422
validation responses are described as the 400s the router actually sends. That description is what
the router's own schema should publish (see the xfail).
Needs ``schemathesis`` (dev extra); the test is skipped without it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tests.conftest import free_port
from tests.router.conftest import FAST_MONITOR, MODEL, RouterServer, run_sims

from kvstack.router.config import load_settings

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "integer"},
            },
        }
    },
}
_ERRORS = {
    str(status): {"description": "OpenAI-shaped error", "content": {"application/json": {"schema": _ERROR}}}
    for status in (400, 401, 404, 413, 429, 502, 503, 504)
}
_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000}, "minItems": 1}
_COMMON = {
    "model": {"type": "string", "enum": [MODEL]},
    "max_tokens": {"type": "integer", "minimum": 0, "maximum": 4},
    "n": {"type": "integer", "minimum": 1, "maximum": 1},
    "user": {"type": "string"},
}
_MESSAGES = {
    "type": "array",
    "minItems": 1,
    "maxItems": 3,
    "items": {
        "type": "object",
        "required": ["role", "content"],
        "properties": {"role": {"type": "string", "enum": ["user", "system"]}, "content": {"type": "string"}},
    },
}
_PROMPT = {
    "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}, _TOKENS]
}


def _post(body: dict[str, Any], streams: bool) -> dict[str, Any]:
    ok: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        event = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
        ok["text/event-stream"] = {"schema": event}
    return {
        "post": {
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {"200": {"description": "the engine's answer", "content": ok}, **_ERRORS},
        }
    }


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": {**_COMMON, **props}}


PROXIED: dict[str, Any] = {
    "/v1/chat/completions": _post(
        _obj(["model", "messages"], messages=_MESSAGES, stream={"type": "boolean"}), True
    ),
    "/v1/completions": _post(_obj(["model", "prompt"], prompt=_PROMPT, stream={"type": "boolean"}), True),
    "/tokenize": _post(_obj(["model", "prompt"], prompt={"type": "string"}), False),
    "/detokenize": _post(_obj(["model", "tokens"], tokens=_TOKENS), False),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterServer]:
    # short generations: a fuzzed request may ask for up to max-model-len tokens
    flags = ("--speed", "100", "--max-model-len", "512")
    with run_sims(tmp_path_factory.mktemp("fuzz"), 1, *flags) as (sim,):
        settings = load_settings(port=free_port(), engines=[sim.url], monitor=FAST_MONITOR, access_log=False)
        r = RouterServer(settings).start()
        try:
            r.wait_available(1)
            yield r
        finally:
            r.stop()


def full_schema(r: RouterServer) -> dict[str, Any]:
    """FastAPI's schema of the admin routes plus the proxied routes described above."""
    fastapi_app = r.app.app
    schema = copy.deepcopy(fastapi_app.openapi())
    for path in schema["paths"].values():
        for operation in path.values():
            if operation["responses"].pop("422", None) is not None:
                operation["responses"]["400"] = _ERRORS["400"]
    schema["paths"].update(PROXIED)
    return schema


@pytest.mark.xfail(
    strict=True,
    reason="router/app.py create_app builds FastAPI with openapi_url=None, and the proxied routes are plain "
    "Starlette Routes, absent from FastAPI's schema. Fix: openapi_url='/openapi.json' "
    "and add the proxied operations (request bodies and error responses, as PROXIED in this file) "
    "through `app.openapi_schema` or FastAPI's `openapi_extra`; and document 400 with the OpenAI "
    "error body where FastAPI's schema says 422 (router/app.py _validation_error answers with 400)",
)
def test_the_router_publishes_its_openapi_schema(served: RouterServer) -> None:
    """A client (or schemathesis) can fetch the router's schema, and it describes the OpenAI routes."""
    resp = httpx.get(f"{served.url}/openapi.json")
    assert resp.status_code == 200
    paths = resp.json()["paths"]
    assert set(PROXIED) <= set(paths)
    assert "400" in paths["/router/engines"]["get"]["responses"]


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

    schema = schemathesis.openapi.from_dict(full_schema(served))
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
    assert tested >= 5
