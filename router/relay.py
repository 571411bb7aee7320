"""One try's exchange with its engine: send the call's bytes, relay the whole answer or the stream.

A stream's frames before the first generated token (a chat's role chunk) are held back with its head,
so a try that produced nothing can still be retried on another engine; once the head is sent the
call is the client's. From then on, where the compiled relay is built (router/native) and the router
serves the connection itself, the rest of the stream goes from the engine to the client socket on a
native thread (:meth:`Relay._forward`): the relay was most of a streamed request's CPU, and the
thread takes ~30 us of it off each event (bench-results/router, "The compiled relay").

Answers of ``/v1/responses`` teach the router which engine stored each response
(:mod:`kvstack.router.sticky`); an engine's 404 for a model it no longer serves becomes a
``model_gone`` failure (:mod:`kvstack.router.model_gone`).
"""

from __future__ import annotations

import asyncio
import time

from kvstack.common.errors import is_openai_error, openai_error_bytes
from kvstack.router.call import Attempt, Call, Headers
from kvstack.router.context import RouterContext
from kvstack.router.engines import EngineState
from kvstack.router.headers import answer_headers
from kvstack.router.model_gone import forget_model, is_model_gone
from kvstack.router.native_relay import NativeResponse, available, open_native
from kvstack.router.protocol import SSEFramer, has_content, split_done
from kvstack.router.retry import AttemptFailure
from kvstack.router.sticky import id_from_body, id_from_frames
from kvstack.router.upstream import UpstreamError, UpstreamResponse

_SSE = "text/event-stream"
_UNBOUNDED = 2**62  # bytes
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tell nginx-style ingresses not to buffer the stream
]


class Relay:
    """The exchange of one proxied route (``path``) with the engine a try was sent to."""

    def __init__(self, ctx: RouterContext, path: str, *, sticky: bool, expose_engine: bool) -> None:
        self.ctx = ctx
        self.path = path
        self.sticky = sticky
        self.expose_engine = expose_engine
        self.native = ctx.settings.native_relay and available()

    async def exchange(self, call: Call, attempt: Attempt) -> AttemptFailure | None:
        """Send the call to the attempt's engine and relay its answer."""
        ctx, ex, engine = self.ctx, call.ex, attempt.decision.engine
        assert ctx.upstream is not None
        ex.routed = time.perf_counter() - ex.start
        ctx.metrics.labelled(ctx.metrics.dispatch, ctx.policy.name).observe(ex.routed)
        headers = (
            call.upstream_headers
            if call.trace is None
            else call.trace.upstream_headers(call.upstream_headers)
        )
        try:
            resp = await self._send(call, engine, headers)
        except UpstreamError as err:
            if err.kind == "connect":
                return AttemptFailure("connect", 502, str(err))  # never the engine's address
            return broken(err, str(err), sent=False)
        try:
            if resp.status == 200 and (resp.content_type or "").startswith(_SSE):
                return await self._relay_stream(call, attempt, resp)
            return await self._relay_whole(call, attempt, resp)
        finally:
            await resp.aclose()

    async def _send(self, call: Call, engine: EngineState, headers: Headers) -> UpstreamResponse:
        """The engine's response: through the native relay for a stream it can forward, else the
        shared client (upstream.py)."""
        upstream, url = self.ctx.upstream, engine.url + self.path
        assert upstream is not None
        if (
            call.transport is None
            or not call.request.stream
            or not self.native
            or not url.startswith("http://")
        ):
            return await upstream.send("POST", url, headers, call.raw)
        resp = await open_native(
            "POST",
            url,
            headers,
            call.raw,
            timeouts=upstream.timeouts,
            max_bytes=_UNBOUNDED,  # a stream has no total bound; its events have, as in SSEFramer
            pool_idle_s=self.ctx.settings.keepalive_expiry_s,
            max_event=self.ctx.settings.max_response_bytes,
        )
        resp.max_bytes = upstream.max_response_bytes  # what read() holds of a whole answer
        return resp

    async def _relay_whole(
        self, call: Call, attempt: Attempt, resp: UpstreamResponse
    ) -> AttemptFailure | None:
        engine = attempt.decision.engine
        try:
            body = await resp.read()
        except UpstreamError as err:
            return broken(err, str(err), sent=False)
        if resp.status >= 500:
            message = f"the engine answered {resp.status}"
            return AttemptFailure("status", resp.status, message, answer=body)
        if is_model_gone(resp.status, body, call.request.model):
            assert call.request.model is not None
            return forget_model(self.ctx, engine, call.request.model, body)
        if self.sticky and resp.status == 200 and (rid := id_from_body(body)) is not None:
            self.ctx.owners.remember(rid, engine.url, self.ctx.clock())
        ex = call.ex
        ex.status, ex.started = resp.status, True
        content_type = resp.content_type or "application/json"
        if resp.status >= 400 and not is_openai_error(body):
            # e.g. an engine's framework answering {"detail": "Not Found"}: clients get one shape
            body, content_type = openai_error_bytes(resp.status, body), "application/json"
        headers = [
            *answer_headers(resp.status, content_type, resp.retry_after),
            *self.engine_header(engine),
            *_flow_headers(call),
        ]
        if call.trace is not None:
            call.trace.first_byte(resp.status)
        await call.send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await call.send({"type": "http.response.body", "body": body})
        attempt.answered = True
        return None

    async def _relay_stream(
        self, call: Call, attempt: Attempt, resp: UpstreamResponse
    ) -> AttemptFailure | None:
        """Relay SSE frames; frames before the first generated token (a chat's role chunk) are held
        back with the head, so a try that produced nothing can still be retried elsewhere."""
        ex, send, decision = call.ex, call.send, attempt.decision
        features = call.features
        assert features is not None
        framer = SSEFramer(self.ctx.settings.max_response_bytes)
        held: list[bytes] = []
        learning = self.sticky  # the stream's first event names its response (router/sticky.py)
        native = resp if isinstance(resp, NativeResponse) else None
        # a [DONE] that ended the frames, kept for the stream's end as the thread keeps it (_forward
        # says why): the engine may end its body a read later, and the client closes on [DONE]
        done = b""
        try:
            async for chunk in resp.chunks():
                frames = framer.feed(chunk)
                if not frames:
                    continue
                if learning:
                    learning = False
                    if (rid := id_from_frames(frames)) is not None:
                        self.ctx.owners.remember(rid, decision.engine.url, self.ctx.clock())
                if not ex.started:
                    if not has_content(frames):
                        held.append(frames)
                        continue
                    ex.ttft = time.perf_counter() - ex.start
                    decision.engine.last_answer = self.ctx.clock()  # answering (router/monitor.py)
                    self.ctx.policy.on_first_token(features, decision)  # the prefill is over
                    if call.demand is not None and call.demand.grant is not None:
                        self.ctx.flow.first_token(call.demand.grant, ex.ttft)
                    await self.start_stream(call, decision.engine)
                    frames = b"".join([*held, frames])
                    held.clear()
                frames, done = split_done(done + frames if done else frames)
                if frames:
                    await send({"type": "http.response.body", "body": frames, "more_body": True})
                if native is not None and ex.started and not done:
                    fd = await self._handover(call, framer)
                    if fd is not None:
                        return await self._forward(call, attempt, native, fd)
        except UpstreamError as err:
            if done:  # the engine failed after its [DONE]: it goes first, where the engine sent it
                await send({"type": "http.response.body", "body": done, "more_body": True})
            return broken(err, f"the engine stream broke off: {err}", sent=ex.started)
        if not ex.started:  # a stream without generated text
            await self.start_stream(call, decision.engine)
        body = b"".join([*held, done, framer.flush()])
        await send({"type": "http.response.body", "body": body, "more_body": False})
        attempt.answered = True
        return None

    async def _handover(self, call: Call, framer: SSEFramer) -> int | None:
        """The client socket's descriptor once the stream can go to the native thread; None: not now
        (:func:`writable_fd`)."""
        transport = call.transport
        if writable_fd(transport) is None:
            return None
        held = framer.flush()  # a partial event: its rest follows from the thread
        if held:
            await call.send({"type": "http.response.body", "body": held, "more_body": True})
            # the framer is empty now: if the socket cannot be handed over, Python goes on cleanly
        return writable_fd(transport)

    async def _forward(
        self, call: Call, attempt: Attempt, resp: NativeResponse, fd: int
    ) -> AttemptFailure | None:
        """The rest of the stream, engine to client, on the native thread; then the stream's end.

        The thread holds back the stream's ``[DONE]`` (:attr:`Forwarded.tail`): it goes out here with
        the terminating chunk, in one write. Written before it, a client that closes as soon as it
        reads ``[DONE]`` (the openai SDK's iterator stops there) could close before the end, and the
        disconnect watcher would count a whole answer as the client's 499."""
        done = await resp.forward(fd, chunked=True)
        self.ctx.metrics.native_streams.labels(done.outcome).inc()
        if done.outcome == "end":
            await call.send({"type": "http.response.body", "body": done.tail, "more_body": False})
            attempt.answered = True
            return None
        if done.tail:  # the engine failed after its [DONE]: it goes first, where the engine sent it
            await call.send({"type": "http.response.body", "body": done.tail, "more_body": True})
        if done.outcome in ("client_gone", "client_stalled"):
            # as the disconnect watcher would (router/exchange.py): the call ends as the client's 499.
            # The thread saw it first: the server learns it here (else it would take the 499 for an
            # app that ended a response unfinished, and log an error for each).
            if call.transport is not None:
                call.transport.abort()
            call.ex.disconnected = True
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)
        if done.outcome == "too_large":  # the words of SSEFramer's refusal
            limit = self.ctx.settings.max_response_bytes
            message = f"an event of the engine's stream is larger than {limit} bytes"
            return broken(UpstreamError("too_large", message), message, sent=True)
        err = UpstreamError("timeout", "the engine stream stalled") if done.outcome == "timeout" else None
        err = err or UpstreamError("read", "the engine stream broke off")
        return broken(err, f"{err} ({done.outcome})", sent=True)

    async def start_stream(self, call: Call, engine: EngineState) -> None:
        """Send the stream's head: from here on the call is the client's and cannot be retried."""
        call.ex.started, call.ex.status = True, 200
        if call.trace is not None:
            call.trace.first_byte(200)
        headers = [*_SSE_HEADERS, *self.engine_header(engine), *_flow_headers(call)]
        await call.send({"type": "http.response.start", "status": 200, "headers": headers})

    def engine_header(self, engine: EngineState) -> Headers:
        if not self.expose_engine:
            return []
        return [(b"x-kvstack-engine", engine.name.encode("latin-1", "replace"))]


def _flow_headers(call: Call) -> Headers:
    """``x-kvstack-priority-class``, ``-queue-position`` (at admission), ``-queue-wait-ms``,
    ``-admission`` and ``-predicted-ttft-ms``."""
    if call.demand is None or call.demand.grant is None:
        return []
    return call.demand.grant.headers()


def writable_fd(transport: asyncio.Transport | None) -> int | None:
    """The client socket's descriptor, if the native thread may write to it now; None when:

    - the transport still holds unsent bytes, which the thread's writes would overtake (the next
      event tries again);
    - the connection is closing or closed: the client is gone and the disconnect watcher is about to
      end the call. (Its socket then has no descriptor: ``fileno()`` is -1, which the thread's
      ``dup`` refused with a ValueError that escaped as a 500.)
    """
    if transport is None or transport.is_closing() or transport.get_write_buffer_size() > 0:
        return None
    sock = transport.get_extra_info("socket")
    fd: int = -1 if sock is None else sock.fileno()
    return fd if fd >= 0 else None


def broken(err: UpstreamError, message: str, *, sent: bool) -> AttemptFailure:
    """A timeout (504) or a response that broke off (502)."""
    return AttemptFailure(err.kind, 504 if err.kind == "timeout" else 502, message, sent=sent)
