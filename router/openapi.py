"""The router's OpenAPI schema: FastAPI's admin routes plus the proxied OpenAI routes.

The proxied routes are plain ASGI endpoints, invisible to FastAPI, so their operations are written
here: request bodies list the fields the router reads (:mod:`kvstack.router.protocol` validates
them) and allow any others, since bodies pass through to the engine unchanged; responses are the
engine's answer or an OpenAI-shaped error. FastAPI's 422 validation responses become the 400s the
router sends instead.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI

from kvstack.router.protocol import MULTIPART, SCORE_PAIRS, Kind

ERROR_REF = "#/components/schemas/OpenAIError"
# kinds served on several paths: each path's operation is named after the path
_SHARED_KINDS = frozenset({"rerank", "score", "audio"})
# every status the proxied routes answer with besides 200 (from the router or the engine)
PROXY_ERRORS = (400, 401, 404, 408, 413, 429, 502, 503, 504)

_ERROR_SCHEMA: dict[str, Any] = {
    "title": "OpenAIError",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "description": "e.g. BadRequestError, NotFoundError"},
                "param": {"type": ["string", "null"], "description": "the request field at fault"},
                "code": {"type": "integer", "description": "the HTTP status"},
            },
        }
    },
}

_TOKENS: dict[str, Any] = {"type": "array", "items": {"type": "integer"}, "minItems": 1}
_MESSAGES: dict[str, Any] = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"type": "string"},
            "content": {"type": ["string", "array", "null"], "items": {"type": "object"}},
        },
    },
}
_PROMPT: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        _TOKENS,
        {"type": "array", "items": _TOKENS, "minItems": 1},
    ]
}
_COMMON: dict[str, Any] = {
    "model": {"type": "string", "minLength": 1},
    "max_tokens": {"type": ["integer", "null"], "minimum": 0},
    "max_completion_tokens": {"type": ["integer", "null"], "minimum": 0},
    "n": {"type": ["integer", "null"], "minimum": 1},
    "user": {"type": ["string", "null"]},
}
_STREAM: dict[str, Any] = {"type": ["boolean", "null"]}


_SCORE_INPUT: dict[str, Any] = {"type": ["string", "array", "object"]}


def _body(required: list[str], **fields: Any) -> dict[str, Any]:
    # additionalProperties: the engine reads the rest (temperature, tools, ...)
    return {
        "type": "object",
        "required": required,
        "properties": {**_COMMON, **fields},
        "additionalProperties": True,
    }


_POOLING: dict[str, Any] = {
    **_body([], input=_PROMPT, messages=_MESSAGES),
    "anyOf": [{"required": ["model", "input"]}, {"required": ["model", "messages"]}],
}

# request body and whether the route streams, per kind
_REQUESTS: dict[Kind, tuple[str, dict[str, Any], bool]] = {
    "chat": (
        "A chat completion",
        _body(["model", "messages"], messages=_MESSAGES, stream=_STREAM),
        True,
    ),
    "completion": ("A completion", _body(["model", "prompt"], prompt=_PROMPT, stream=_STREAM), True),
    "embedding": ("Embeddings", _body(["model", "input"], input=_PROMPT), False),
    "tokenize": (
        "Token ids of a prompt or of chat messages",
        {
            **_body([], prompt=_PROMPT, messages=_MESSAGES),
            "anyOf": [{"required": ["prompt"]}, {"required": ["messages"]}],
        },
        False,
    ),
    "detokenize": ("The text of token ids", _body(["tokens"], tokens=_TOKENS), False),
    "responses": (
        "A response (Responses API); input messages are routed like a chat",
        _body(
            ["model", "input"],
            input={
                "anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "object"}}]
            },
            instructions={"type": ["string", "null"]},
            max_output_tokens={"type": ["integer", "null"], "minimum": 1},
            stream=_STREAM,
        ),
        True,
    ),
    "messages": (
        "A message (Anthropic's Messages API); its messages are routed like a chat",
        {
            "type": "object",
            "required": ["model", "messages", "max_tokens"],
            "properties": {
                "model": {"type": "string", "minLength": 1},
                "messages": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["role", "content"],
                        "properties": {
                            "role": {"enum": ["user", "assistant"]},
                            "content": {"type": ["string", "array"], "items": {"type": "object"}},
                        },
                    },
                },
                "system": {"type": ["string", "array", "null"], "items": {"type": "object"}},
                "max_tokens": {"type": "integer", "minimum": 1},
                "stream": _STREAM,
            },
            "additionalProperties": True,
        },
        True,
    ),
    "rerank": (
        "Documents ranked by relevance to a query (a score model)",
        _body(
            ["model", "query", "documents"],
            query={"type": ["string", "object"]},
            documents={"type": ["array", "string", "object"], "minItems": 1},
            top_n={"type": ["integer", "null"], "minimum": 0},
        ),
        False,
    ),
    "score": (
        "Scores of text pairs (a score model)",
        {
            **_body(["model"], text_1=_SCORE_INPUT, text_2=_SCORE_INPUT),
            "anyOf": [{"required": list(pair)} for pair in SCORE_PAIRS],
        },
        False,
    ),
    "classify": ("Class probabilities (a classify model)", _POOLING, False),
    "pooling": ("Pooled hidden states (a pooling model)", _POOLING, False),
    "audio": (
        "Text of an audio file (a transcription model): multipart/form-data with file and model",
        {
            "type": "object",
            "required": ["file", "model"],
            "properties": {
                "file": {"type": "string", "format": "binary"},
                "model": {"type": "string", "minLength": 1},
                "stream": {"type": "boolean"},
            },
            "additionalProperties": True,
        },
        True,
    ),
}


def error_response(status: int) -> dict[str, Any]:
    """An OpenAPI response object for an OpenAI-shaped error (usable in FastAPI's ``responses=``)."""
    return {
        "description": f"{status}: OpenAI-shaped error",
        "content": {"application/json": {"schema": {"$ref": ERROR_REF}}},
    }


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a FastAPI route that can answer with these error statuses."""
    return {status: error_response(status) for status in statuses}


_READY: dict[str, Any] = {
    "type": "object",
    "required": ["ready", "reason", "available_engines", "syncing_engines", "engines"],
    "properties": {
        "ready": {"type": "boolean"},
        "reason": {"type": "string", "enum": ["ready", "no_engine", "syncing", "sync_timed_out"]},
        "available_engines": {"type": "integer", "minimum": 0},
        # available engines whose KV-event history the router is still replaying (router/readiness.py)
        "syncing_engines": {"type": "integer", "minimum": 0},
        "engines": {"type": "integer", "minimum": 0},
    },
}
READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "An engine is available (or `require_engine=false` and none is) and the available engines'"
            " KV-event history is in the index"
        ),
        "content": {"application/json": {"schema": _READY}},
    },
    503: {
        "description": "No engine is available, or their history is being replayed",
        "content": {"application/json": {"schema": _READY}},
    },
}

METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text exposition format",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


_SSE_EVENT: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {
            "type": "object",
            "properties": {
                "data": {"type": "string"},
                "event": {"type": "string"},
                "id": {"type": "string"},
                "retry": {"type": "integer"},
            },
        },
    ]
}


def proxied_operation(kind: Kind, path: str | None = None) -> dict[str, Any]:
    """The OpenAPI path item of one proxied route (POST only); ``path`` names its operation when
    several routes share a kind (rerank, score, audio)."""
    summary, body, streams = _REQUESTS[kind]
    media = "multipart/form-data" if kind in MULTIPART else "application/json"
    operation_id = f"proxy_{kind}"
    if path is not None and kind in _SHARED_KINDS:
        operation_id = "proxy_" + "_".join(p for p in path.strip("/").split("/") if p)
    ok: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        # the stream as text, or (OpenAPI 3.2-aware validators such as schemathesis) each event:
        # its data a JSON chunk, named by `event:` on the Messages API's stream
        ok["text/event-stream"] = {"schema": _SSE_EVENT}
    responses: dict[str, Any] = {
        "200": {"description": "The engine's answer, relayed unchanged", "content": ok},
        **{str(s): error_response(s) for s in PROXY_ERRORS},
    }
    return {
        "post": {
            "summary": summary,
            "operationId": operation_id,
            "tags": ["OpenAI"],
            "requestBody": {"required": True, "content": {media: {"schema": body}}},
            "responses": responses,
        }
    }


def with_proxied(
    generated: dict[str, Any], routes: Iterable[tuple[str, Kind]], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A copy of FastAPI's ``generated`` schema with the proxied ``routes``, the ``extra`` path
    items (routes that are plain ASGI apps), and 400 for 422."""
    schema = copy.deepcopy(generated)
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", error_response(400))
    proxied = {p: proxied_operation(k, p) for p, k in routes}
    schema["paths"] = {**schema.get("paths", {}), **proxied, **copy.deepcopy(extra or {})}
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    # nothing answers with FastAPI's validation error shape
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["OpenAIError"] = copy.deepcopy(_ERROR_SCHEMA)
    return schema


def install(app: FastAPI, routes: Iterable[tuple[str, Kind]], extra: dict[str, Any] | None = None) -> None:
    """Make ``app.openapi()`` (served at ``app.openapi_url``) return the full schema, built once."""
    routes = tuple(routes)
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            # generate() caches FastAPI's own schema there; it is replaced by the full one
            app.openapi_schema = with_proxied(generate(), routes, extra)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
