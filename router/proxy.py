"""The proxy: one ASGI endpoint per OpenAI route, from client bytes to engine bytes and back.

Per request: authenticate, rate-limit, read the body once (bounded), validate the fields the router
needs, admit through the model's queue, choose an engine, forward the original bytes, and relay the
answer. Streams are relayed frame by frame; a client that goes away cancels the handler, which
closes the upstream connection, so the engine aborts the request. Connect failures and 503s are
retried on another engine while nothing has been sent to the client; never after.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from kvstack.common.errors import OpenAIError, is_openai_error, openai_error_bytes
from kvstack.router.admission import Admission, reject
from kvstack.router.context import REQUEST_ID_KEY, RouterContext
from kvstack.router.ejection import record_failure, record_success
from kvstack.router.engines import EngineState
from kvstack.router.exchange import (
    ClientGone,
    Exchange,
    RetryLater,
    account,
    read_body,
    send_error,
    watch_disconnect,
)
from kvstack.router.headers import answer_headers, scan_headers, upstream_headers
from kvstack.router.policies.base import Decision, RequestFeatures
from kvstack.router.prompt_source import PromptSource
from kvstack.router.prompts import prompt_text
from kvstack.router.protocol import Kind, ParsedRequest, SSEFramer, error_event, has_content, parse_request
from kvstack.router.upstream import UpstreamError, UpstreamResponse

Scope = dict[str, Any]
Receive = Any
Send = Any

log = logging.getLogger(__name__)

_SSE = "text/event-stream"
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tell nginx-style ingresses not to buffer the stream
]


class ProxyEndpoint:
    """The ASGI app behind one proxied route (``kind`` tells how to read its body)."""

    def __init__(self, ctx: RouterContext, kind: Kind, path: str) -> None:
        self.ctx = ctx
        self.kind: Kind = kind
        self.path = path
        # optional parts of the policy interface, looked up once
        self._needs_text = bool(getattr(ctx.policy, "needs_text", False))
        self._first_token: Callable[[RequestFeatures, Decision], None] | None = getattr(
            ctx.policy, "on_first_token", None
        )
        self._session_name = ctx.settings.session_header.encode("latin-1")
        self._expose_engine = ctx.settings.expose_engine_header
        self.admission = Admission(ctx)
        admission = self.admission
        self.prompts = PromptSource(ctx, lambda model: [e.url for e in admission.available(model or None)])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = self.ctx
        ex = Exchange(request_id=scope.get(REQUEST_ID_KEY) or "", start=time.perf_counter())
        admitted_key: str | None = None
        held = 0  # request-body bytes taken from the router's budget, given back at the end
        try:
            auth, declared, session_header = scan_headers(scope["headers"], self._session_name)
            key = ctx.keys.identify(auth)
            if key is None:
                raise reject(ctx, "auth", OpenAIError(401, "invalid or missing API key"))
            ex.key = key
            if ctx.limiter.enabled:
                refused = ctx.limiter.admit(key, ctx.clock())
                if refused is not None:
                    reason, wait = refused
                    raise reject(ctx, reason, RetryLater(429, _LIMIT_MESSAGES[reason], wait))
                admitted_key = key
            try:
                async with asyncio.timeout(ctx.settings.body_timeout_s):
                    raw = await read_body(receive, ctx.settings.max_body_bytes, declared, ctx.bodies)
                    held = len(raw)
            except TimeoutError:
                raise reject(
                    ctx, "body_timeout", OpenAIError(408, "request body not received in time")
                ) from None
            except OpenAIError as err:
                raise reject(ctx, "body_budget" if err.status == 503 else "body_too_large", err) from None
            request = parse_request(self.kind, raw)
            ex.model = request.model or ""
            ex.stream = request.stream
            await self._guarded(scope, receive, send, ex, request, raw, session_header)
        except ClientGone:
            ex.disconnected, ex.status = True, 499
        except OpenAIError as err:
            ex.status, ex.error = err.status, err.message
            if not ex.started:
                await send_error(send, err)
        finally:
            ctx.bodies.give(held)
            if admitted_key is not None:
                ctx.limiter.release(admitted_key)
            account(ctx.metrics, ex, self.path, ctx.settings.access_log)

    # ------------------------------------------------------------------ request path

    async def _guarded(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        ex: Exchange,
        request: ParsedRequest,
        raw: bytes,
        session_header: bytes | None,
    ) -> None:
        """Run the request while a watcher cancels it the moment the client disconnects."""
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(watch_disconnect(receive, task, ex))
        try:
            await self._admit_and_route(scope, send, ex, request, raw, session_header)
        except asyncio.CancelledError:
            if not ex.disconnected:
                raise  # the server is shutting down
            task.uncancel()
            ex.status = 499
        finally:
            ex.finished = True
            watcher.cancel()

    async def _admit_and_route(
        self,
        scope: Scope,
        send: Send,
        ex: Exchange,
        request: ParsedRequest,
        raw: bytes,
        session_header: bytes | None,
    ) -> None:
        admission, model = self.admission, request.model
        held_until = None if model is None else await admission.hold(model)

        async def route(candidates: list[EngineState] | None) -> None:
            while True:
                try:
                    candidates = candidates or admission.candidates(model)
                    await self._route(scope, send, ex, request, raw, session_header, candidates)
                    return
                except OpenAIError as err:
                    # A woken engine may be announced before it listens (a readiness probe that is
                    # missing or too early): the user asked to wait, so wait out the hold's time.
                    if held_until is None or model is None or err.status not in (502, 503) or ex.started:
                        raise
                    if self.ctx.clock() >= held_until:
                        raise
                    await admission.wait_held(model, held_until)
                    candidates = None  # look again: the engine may have been ejected meanwhile

        await admission.queued(model, route)

    async def _route(
        self,
        scope: Scope,
        send: Send,
        ex: Exchange,
        request: ParsedRequest,
        raw: bytes,
        session_header: bytes | None,
        candidates: list[EngineState],
    ) -> None:
        ctx = self.ctx
        settings, metrics, policy = ctx.settings, ctx.metrics, ctx.policy
        session_key = session_header.decode("latin-1") if session_header else request.user
        tokens, prompt_len = None, None
        if policy.needs_tokens:
            tokens, prompt_len = await self.prompts.tokens(request, policy.name)
        cache_salt = request.body.get("cache_salt")
        features = RequestFeatures(
            model=request.model or "",
            request_id=ex.request_id,
            session_key=session_key,
            prompt_token_ids=tokens,
            prompt_len=prompt_len,
            cache_salt=cache_salt if isinstance(cache_salt, str) else None,
            max_tokens=request.max_tokens,
            prompt_text=prompt_text(request) if self._needs_text else None,
        )
        headers = self._upstream_headers(scope, ex.request_id)
        tried: set[str] = set()
        failure: OpenAIError | None = None
        for attempt in range(settings.max_attempts):
            if attempt:
                candidates = [e for e in self.admission.available(request.model) if e.url not in tried]
                if not candidates:
                    break
            t0 = time.perf_counter()
            decision = policy.choose(features, candidates, ctx.clock())
            metrics.labelled(metrics.decision, policy.name).observe(time.perf_counter() - t0)
            metrics.labelled(metrics.decisions, policy.name, decision.reason).inc()
            engine = decision.engine
            tried.add(engine.url)
            ex.engine, ex.reason, ex.attempts = engine.name, decision.reason, attempt + 1
            retry = await self._attempt(
                send, ex, features, decision, headers, raw, attempt + 1 < settings.max_attempts
            )
            if retry is None:
                return
            failure = retry
            metrics.retries.labels(
                features.model, "connect" if retry.status == 502 else str(retry.status)
            ).inc()
        raise failure or OpenAIError(503, f"no engine is available for model {features.model!r}")

    async def _attempt(
        self,
        send: Send,
        ex: Exchange,
        features: RequestFeatures,
        decision: Decision,
        headers: list[tuple[bytes, bytes]],
        raw: bytes,
        may_retry: bool,
    ) -> OpenAIError | None:
        """One try on one engine; returns an error to retry with, or None when the request is done."""
        ctx = self.ctx
        assert ctx.upstream is not None
        engine = decision.engine
        engine.in_flight += 1
        ctx.policy.on_dispatch(features, decision)
        ok = False
        try:
            try:
                ex.routed = time.perf_counter() - ex.start
                ctx.metrics.labelled(ctx.metrics.dispatch, ctx.policy.name).observe(ex.routed)
                resp = await ctx.upstream.send("POST", engine.url + self.path, headers, raw)
            except UpstreamError as err:
                self._engine_failed(engine, err.kind)
                if err.kind == "connect":
                    return OpenAIError(502, str(err))  # never the engine's address: clients read it
                raise OpenAIError(504 if err.kind == "timeout" else 502, str(err)) from None
            try:
                if resp.status == 503 and may_retry:
                    self._engine_failed(engine, "status_503")
                    return OpenAIError(503, "the engine is unavailable")
                ok = await self._relay(send, ex, features, decision, resp)
            finally:
                await resp.aclose()
            return None
        finally:
            engine.in_flight -= 1
            ctx.policy.on_finish(features, decision, ok)

    async def _relay(
        self, send: Send, ex: Exchange, features: RequestFeatures, decision: Decision, resp: UpstreamResponse
    ) -> bool:
        """Send the engine's answer to the client; True when the engine did its part."""
        engine = decision.engine
        if resp.status != 200 or not (resp.content_type or "").startswith(_SSE):
            try:
                body = await resp.read()
            except UpstreamError as err:
                self._engine_failed(engine, err.kind)
                raise OpenAIError(504 if err.kind == "timeout" else 502, str(err)) from None
            ok = resp.status < 500
            self._engine_done(engine, ok, f"status_{resp.status}")
            ex.status, ex.started = resp.status, True
            content_type = resp.content_type or "application/json"
            if resp.status >= 400 and not is_openai_error(body):
                # e.g. an engine's framework answering {"detail": "Not Found"}: clients get one shape
                body, content_type = openai_error_bytes(resp.status, body), "application/json"
            headers = answer_headers(resp.status, content_type, resp.retry_after)
            if self._expose_engine:
                headers.append((b"x-kvstack-engine", engine.name.encode("latin-1", "replace")))
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return ok
        return await self._relay_stream(send, ex, features, decision, resp)

    async def _relay_stream(
        self, send: Send, ex: Exchange, features: RequestFeatures, decision: Decision, resp: UpstreamResponse
    ) -> bool:
        engine = decision.engine
        ex.started, ex.status = True, 200
        headers = _SSE_HEADERS
        if self._expose_engine:
            headers = [*_SSE_HEADERS, (b"x-kvstack-engine", engine.name.encode("latin-1", "replace"))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        framer = SSEFramer(self.ctx.settings.max_response_bytes)
        waiting_first = True
        try:
            async for chunk in resp.chunks():
                frames = framer.feed(chunk)
                if not frames:
                    continue
                if waiting_first and has_content(frames):
                    waiting_first = False
                    ex.ttft = time.perf_counter() - ex.start
                    if self._first_token is not None:
                        self._first_token(features, decision)  # the prefill is over
                await send({"type": "http.response.body", "body": frames, "more_body": True})
        except UpstreamError as err:
            self._engine_failed(engine, err.kind)
            ex.status, ex.error = (504 if err.kind == "timeout" else 502), str(err)
            message = f"the engine stream broke off: {err}"
            await send(
                {"type": "http.response.body", "body": error_event(ex.status, message), "more_body": False}
            )
            return False
        await send({"type": "http.response.body", "body": framer.flush(), "more_body": False})
        record_success(engine)
        return True

    # ------------------------------------------------------------------ helpers

    def _upstream_headers(self, scope: Scope, request_id: str) -> list[tuple[bytes, bytes]]:
        key = self.ctx.settings.engine_api_key
        engine_key = None if key is None else key.get_secret_value().encode()
        client = scope.get("client")
        # when the router does not check keys, the engine's own --api-key does
        return upstream_headers(
            scope["headers"], request_id, engine_key, not self.ctx.keys.enabled, client[0] if client else None
        )

    def _engine_failed(self, engine: EngineState, kind: str) -> None:
        ctx, settings = self.ctx, self.ctx.settings
        ctx.metrics.upstream_errors.labels(engine.name, kind).inc()
        if record_failure(engine, ctx.clock(), settings.eject_after_failures, settings.eject_duration_s):
            ctx.metrics.ejections.labels(engine.name).inc()
            log.warning(
                "engine ejected after %d consecutive failures",
                engine.consecutive_failures,
                extra={"engine": engine.name, "eject_s": settings.eject_duration_s},
            )

    def _engine_done(self, engine: EngineState, ok: bool, kind: str) -> None:
        if ok:
            record_success(engine)
        else:
            self._engine_failed(engine, kind)


_LIMIT_MESSAGES = {
    "rate_limit": "rate limit exceeded for this API key",
    "key_concurrency": "too many concurrent requests for this API key",
}
