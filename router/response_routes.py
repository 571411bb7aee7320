"""``GET /v1/responses/{response_id}`` and ``POST /v1/responses/{response_id}/cancel``, as vLLM 0.24
serves them, sent to the engine that stored the response (:mod:`kvstack.router.sticky`).

Per request: authenticate, look the id up, forward the request (its query string, e.g. vLLM's
``stream`` and ``starting_after``) to that engine, relay the answer; a stream is relayed as it
comes. An id the router does not know, or whose engine is gone (its store went with it), is
answered 404 as vLLM answers an unknown id. Nothing is retried elsewhere: only that engine has it.
"""

from __future__ import annotations

import time
from typing import Any

from kvstack.common.errors import OpenAIError, is_openai_error, openai_error_bytes
from kvstack.router.admission import reject
from kvstack.router.context import REQUEST_ID_KEY, RouterContext
from kvstack.router.exchange import ClientGone, Exchange, account, read_body, settle_failure
from kvstack.router.headers import answer_headers, scan_headers, upstream_headers
from kvstack.router.openapi import error_response
from kvstack.router.sticky import unknown_response
from kvstack.router.upstream import UpstreamError

Scope = dict[str, Any]

RETRIEVE = "/v1/responses/{response_id}"
CANCEL = "/v1/responses/{response_id}/cancel"
STORED_ROUTES: tuple[tuple[str, str], ...] = ((RETRIEVE, "GET"), (CANCEL, "POST"))
_MAX_BODY = 64 * 1024  # a cancel carries no body worth more


def stored_operations() -> dict[str, Any]:
    """The OpenAPI path items of :data:`STORED_ROUTES` (``/openapi.json``)."""
    # vLLM's ids are resp_ + hex; anything else is simply unknown (404)
    id_schema = {"type": "string", "pattern": "^resp_[A-Za-z0-9_-]{1,128}$"}
    param = {"name": "response_id", "in": "path", "required": True, "schema": id_schema}
    ok = {
        "description": "The stored response, from the engine that holds it",
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
    errors = {str(s): error_response(s) for s in (400, 401, 404, 502, 504)}
    items: dict[str, Any] = {}
    for path, method in STORED_ROUTES:
        name = "retrieve_response" if path == RETRIEVE else "cancel_response"
        items[path] = {
            method.lower(): {
                "summary": "Retrieve a stored response" if path == RETRIEVE else "Cancel a response",
                "operationId": name,
                "tags": ["OpenAI"],
                "parameters": [param],
                "responses": {"200": ok, **errors},
            }
        }
    return items


class StoredResponseEndpoint:
    """The ASGI app behind one of :data:`STORED_ROUTES` (``path`` is its template, the metric label)."""

    def __init__(self, ctx: RouterContext, path: str) -> None:
        self.ctx = ctx
        self.path = path

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        ctx = self.ctx
        ex = Exchange(request_id=scope.get(REQUEST_ID_KEY) or "", start=time.perf_counter())
        try:
            auth, declared, _ = scan_headers(scope["headers"], b"")
            key = ctx.keys.identify(auth)
            if key is None:
                raise reject(ctx, "auth", OpenAIError(401, "invalid or missing API key"))
            ex.key = key
            body = b""
            if scope["method"] == "POST":
                body = await read_body(receive, _MAX_BODY, declared, ctx.bodies)
            ctx.bodies.give(len(body))  # relayed at once; not held for retries
            await self._forward(scope, send, ex, body)
        except (ClientGone, OpenAIError) as err:
            await settle_failure(send, ex, err)
        finally:
            ex.finished = True
            account(ctx.metrics, ex, self.path, ctx.settings.access_log)

    async def _forward(self, scope: Scope, send: Any, ex: Exchange, body: bytes) -> None:
        ctx = self.ctx
        assert ctx.upstream is not None
        response_id: str = scope["path_params"]["response_id"]
        owner = ctx.owners.owner(response_id, ctx.clock())
        engine = None if owner is None else ctx.registry.get(owner)
        if engine is None:
            raise unknown_response(response_id)
        ex.engine, ex.attempts = engine.name, 1
        shown = [(b"x-kvstack-engine", engine.name.encode("latin-1", "replace"))]
        engine_header = shown if ctx.settings.expose_engine_header else []
        url = engine.url + scope["path"]
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        secret = ctx.settings.engine_api_key
        headers = upstream_headers(
            scope["headers"],
            ex.request_id,
            None if secret is None else secret.get_secret_value().encode(),
            not ctx.keys.enabled,
            (scope.get("client") or (None,))[0],
        )
        try:
            resp = await ctx.upstream.send(scope["method"], url, headers, body or None)
        except UpstreamError as err:
            raise OpenAIError(504 if err.kind == "timeout" else 502, str(err)) from None
        try:
            content_type = resp.content_type or "application/json"
            if content_type.startswith("text/event-stream"):
                ex.started, ex.status = True, resp.status
                head = [*answer_headers(resp.status, content_type, None), *engine_header]
                await send({"type": "http.response.start", "status": resp.status, "headers": head})
                async for chunk in resp.chunks():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            answer = await resp.read()
            if resp.status >= 400 and not is_openai_error(answer):
                answer, content_type = openai_error_bytes(resp.status, answer), "application/json"
            ex.started, ex.status = True, resp.status
            headers = [*answer_headers(resp.status, content_type, resp.retry_after), *engine_header]
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            await send({"type": "http.response.body", "body": answer})
        except UpstreamError as err:
            if ex.started:  # a stream that broke off: end it; the client sees it cut short
                ex.error = str(err)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            raise OpenAIError(504 if err.kind == "timeout" else 502, str(err)) from None
        finally:
            await resp.aclose()
