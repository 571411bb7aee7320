"""The proxy: one ASGI endpoint per OpenAI route, from client bytes to engine bytes and back.

Per request: authenticate, rate-limit, read the body once (bounded), validate the fields the router
needs, admit through the model's queue, choose an engine, forward the original bytes, and relay the
answer. Each request becomes one :class:`Call`, carried down every step. Streams are relayed frame
by frame, and their head goes to the client with the first generated token: until then a failed try
can be retried on another engine (:mod:`kvstack.router.retry` decides), after it never. A client that goes
away cancels the handler, which closes the upstream connection, so the engine aborts the request.
An engine the monitor declares down ends the tries waiting on it at once. Every try's outcome feeds
outlier detection (:mod:`kvstack.router.outcome_recorder`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from kvstack.common.errors import OpenAIError
from kvstack.router.admission import Admission, Demand, reject
from kvstack.router.call import Attempt, Call, Headers, Send
from kvstack.router.context import REQUEST_ID_KEY, TRANSPORT_KEY, RouterContext
from kvstack.router.engines import EngineState
from kvstack.router.exchange import (
    ClientGone,
    EngineAnswer,
    Exchange,
    RetryLater,
    account,
    read_body,
    settle_failure,
    watch_disconnect,
)
from kvstack.router.headers import content_type, header_value, scan_headers, upstream_headers
from kvstack.router.model_gone import HoldAgain
from kvstack.router.outcome_recorder import OutcomeRecorder
from kvstack.router.policies.base import Decision, RequestFeatures
from kvstack.router.prompt_source import PromptSource
from kvstack.router.prompts import prompt_text
from kvstack.router.protocol import MULTIPART, Kind, error_event, parse_request
from kvstack.router.relay import Relay
from kvstack.router.retry import AttemptFailure, next_step
from kvstack.router.sticky import prefer_owner, previous_owner

Scope = dict[str, Any]
Receive = Any


class ProxyEndpoint:
    """The ASGI app behind one proxied route (``kind`` tells how to read its body)."""

    def __init__(self, ctx: RouterContext, kind: Kind, path: str) -> None:
        self.ctx = ctx
        self.kind: Kind = kind
        self.path = path
        self.multipart = kind in MULTIPART  # its fields are read from the form, by Content-Type
        self.sticky = kind == "responses"  # stored responses: learn their engine (router/sticky.py)
        settings = ctx.settings
        self.relay = Relay(ctx, path, sticky=self.sticky, expose_engine=settings.expose_engine_header)
        self._session_name = settings.session_header.encode("latin-1")
        self.outcomes = OutcomeRecorder(ctx)
        self.admission = Admission(ctx)
        admission = self.admission
        self.prompts = PromptSource(ctx, lambda model: [e.url for e in admission.available(model or None)])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = self.ctx
        ex = Exchange(request_id=scope.get(REQUEST_ID_KEY) or "", start=time.perf_counter())
        admitted_key: str | None = None
        held = 0  # request-body bytes taken from the router's budget, given back at the end
        tracing = ctx.tracing
        trace = None if tracing is None else tracing.begin("POST", self.path, scope["headers"], ex.request_id)
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
            request = parse_request(
                self.kind, raw, content_type(scope["headers"]) if self.multipart else None
            )
            ex.model = request.model or ""
            ex.stream = request.stream
            session_key = session_header.decode("latin-1") if session_header else request.user
            peer = scope.get("client")
            call = Call(ex, request, raw, send, scope["headers"], peer[0] if peer else None, session_key)
            call.trace = trace
            call.transport = scope.get(TRANSPORT_KEY)
            await self._guarded(call, receive)
        except (ClientGone, OpenAIError) as err:
            await settle_failure(send, ex, err)
        finally:
            ctx.bodies.give(held)
            if admitted_key is not None:
                ctx.limiter.release(admitted_key)
            account(ctx.metrics, ex, self.path, ctx.settings.access_log)
            if trace is not None:
                trace.finish(ex)

    # ------------------------------------------------------------------ request path

    async def _guarded(self, call: Call, receive: Receive) -> None:
        """Run the call while a watcher cancels it the moment the client disconnects."""
        ex = call.ex
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(watch_disconnect(receive, task, ex))
        try:
            await self._admit_and_route(call)
        except asyncio.CancelledError:
            if not ex.disconnected:
                raise  # the server is shutting down
            task.uncancel()
            ex.status = 499
        finally:
            ex.finished = True
            watcher.cancel()

    async def _admit_and_route(self, call: Call) -> None:
        admission, model, trace = self.admission, call.request.model, call.trace
        arrived = time.perf_counter()  # the queue span: from here until routing starts
        held_until: float | None = None  # the hold's deadline, when the request was held

        async def route(candidates: list[EngineState] | None) -> None:
            nonlocal held_until
            if call.demand is not None and call.demand.held_until is not None:
                held_until = call.demand.held_until
            if trace is not None:
                trace.queued(time.perf_counter() - arrived)
            holds_left = self.ctx.settings.max_attempts  # bounds re-holds of a model that vanishes again
            while True:
                try:
                    await self._route(call, candidates or admission.candidates(model))
                    return
                except HoldAgain as again:  # router/model_gone.py: no engine serves it any more
                    holds_left -= 1
                    if model is None or holds_left < 0:
                        await self._give_up(call, again.failure, None)
                        return
                    held_until = await admission.hold(model) or held_until
                    candidates = None
                except OpenAIError as err:
                    # A woken engine may be announced before it listens (a readiness probe that is
                    # missing or too early): the user asked to wait, so wait out the hold's time.
                    if held_until is None or model is None or err.status not in (502, 503) or call.ex.started:
                        raise
                    if self.ctx.clock() >= held_until:
                        raise
                    await admission.wait_held(model, held_until)
                    candidates = None  # look again: the engine may have been ejected meanwhile

        try:
            if model is not None and self.kind in _FLOW_KINDS and self.ctx.settings.flow_control.enabled:
                # a held model's request waits in the flow queue (Admission.queued)
                call.demand = await self._demand(call)
            elif model is not None:
                held_until = await admission.hold(model)
            await admission.queued(model, call.demand, route)
        finally:
            if trace is not None:  # refused or cancelled while it waited (else recorded already)
                trace.queued(time.perf_counter() - arrived)

    async def _demand(self, call: Call) -> Demand:
        """The request's tenant, class and prefill cost for flow control (400: an unknown class).

        The cost is the prompt's length in tokens when the policy tokenizes it (tokenized here,
        once, before it may wait) less what the best engine is expected to hold in its cache (the
        policy's index), else its body's bytes / 4: roughly a token per 4 bytes of text.
        """
        flow, ex = self.ctx.settings.flow_control, call.ex
        tenant, cls = self.ctx.flow.classify(
            header_value(call.client_headers, flow.tenant_header.encode()),
            header_value(call.client_headers, flow.priority_header.encode()),
            ex.key,
        )
        ex.tenant, ex.priority_class = tenant, cls.name
        cost: float = len(call.raw) / 4
        candidates = self.admission.available(call.request.model)
        if self.ctx.policy.needs_tokens and candidates:
            features = await self._prepare(call)
            policy, clock = self.ctx.policy, self.ctx.clock
            prompt = float(_prompt_len(features) or cost)
            hit = policy.expected_hit(features, candidates, clock()).tokens
            return Demand(
                tenant,
                cls,
                max(0.0, prompt - hit),
                prompt_tokens=prompt,
                hits=lambda e: policy.expected_hit(features, [e], clock()),
            )
        return Demand(tenant, cls, cost)

    async def _route(self, call: Call, candidates: list[EngineState]) -> None:
        """Try engines the policy picks until one answers or :func:`next_step` says stop."""
        ctx, ex = self.ctx, call.ex
        settings, metrics, policy = ctx.settings, ctx.metrics, ctx.policy
        features = call.features or await self._prepare(call)
        if self.sticky:  # previous_response_id: the engine that stored it, when known
            owner = previous_owner(ctx.owners, call.request.body, ctx.clock())
            candidates = prefer_owner(owner, candidates)
        attempts = 0
        while True:
            attempts += 1
            t0 = time.perf_counter()
            decision = policy.choose(features, candidates, ctx.clock())
            took = time.perf_counter() - t0
            metrics.labelled(metrics.decision, policy.name).observe(took)
            if call.trace is not None:
                call.trace.decided(took, decision, policy.name)
            metrics.labelled(metrics.decisions, policy.name, decision.reason).inc()
            call.tried.append(decision.engine.url)
            ex.engine, ex.reason, ex.attempts = decision.engine.name, decision.reason, len(call.tried)
            failure = await self._attempt(call, decision)
            if failure is None:
                return
            candidates = self.admission.available(call.request.model, call.tried)
            model = call.request.model
            verdict = next_step(
                failure,
                attempts=attempts,
                max_attempts=settings.max_attempts,
                untried=len(candidates),
                held=model is not None and ctx.holds.holds(model),
            )
            if verdict.reason == "hold":
                raise HoldAgain(failure)
            if not verdict.retry:
                await self._give_up(call, failure, decision.engine)
                return
            metrics.retries.labels(features.model, failure.label).inc()

    async def _prepare(self, call: Call) -> RequestFeatures:
        """The call's features (tokenized once, traced as ``tokenize``) and its upstream headers."""
        t0 = time.perf_counter()
        call.features = features = await self._features(call)
        if call.trace is not None:
            call.trace.tokenized(time.perf_counter() - t0, features.prompt_len)
        call.upstream_headers = self._upstream_headers(call)
        return features

    async def _features(self, call: Call) -> RequestFeatures:
        policy, request = self.ctx.policy, call.request
        tokens, prompt_len = None, None
        if policy.needs_tokens:
            tokens, prompt_len = await self.prompts.tokens(request, policy.name)
        cache_salt = request.body.get("cache_salt")
        return RequestFeatures(
            model=request.model or "",
            request_id=call.ex.request_id,
            session_key=call.session_key,
            prompt_token_ids=tokens,
            prompt_len=prompt_len,
            cache_salt=cache_salt if isinstance(cache_salt, str) else None,
            max_tokens=request.max_tokens,
            prompt_text=prompt_text(request) if policy.needs_text else None,
        )

    async def _attempt(self, call: Call, decision: Decision) -> AttemptFailure | None:
        """One try on one engine; the failure to decide on, or None when the call is answered."""
        ctx, engine = self.ctx, decision.engine
        features = call.features
        assert features is not None
        engine.in_flight += 1
        ctx.policy.on_dispatch(features, decision)
        if call.trace is not None:
            call.trace.upstream_started(decision, engine.url + self.path, len(call.tried))
        grant = call.demand.grant if call.demand is not None else None
        if grant is not None:
            prompt = _prompt_len(features) or grant.cost
            uncached = max(0.0, prompt - decision.predicted_hit_tokens)
            ctx.flow.dispatched(
                grant, engine, uncached, streamed=call.request.stream, max_tokens=call.request.max_tokens
            )
            call.ex.queue_wait = grant.queue_wait_s
        failure: AttemptFailure | None = None
        ended = False  # the try ran to an outcome (not cancelled by the client or a shutdown)
        try:
            async with asyncio.timeout(None) as cutoff:
                attempt = Attempt(decision, cutoff)
                engine.on_down.add(attempt.abort)
                try:
                    failure = await self.relay.exchange(call, attempt)
                finally:
                    engine.on_down.discard(attempt.abort)
            ended = True
        except TimeoutError:
            if not attempt.lost:
                raise
            if not attempt.answered:  # else it went down while the finished answer was closed
                message = "the engine stopped responding (it failed its health checks)"
                failure = AttemptFailure("engine_lost", 504, message, sent=call.ex.started)
            ended = True
        finally:
            engine.in_flight -= 1
            ctx.policy.on_finish(features, decision, ended and failure is None)
            if call.trace is not None:
                call.trace.upstream_ended(failure, ended)
            if grant is not None:
                ctx.flow.finished(grant, engine)
        self.outcomes.record(engine, failure)
        return failure

    async def _give_up(self, call: Call, failure: AttemptFailure, engine: EngineState | None) -> None:
        """Answer with the last failure: an error event ends a stream under way, else an error."""
        ex = call.ex
        if failure.sent:
            ex.status, ex.error = failure.status, failure.message
            event = error_event(failure.status, failure.message)
            await call.send({"type": "http.response.body", "body": event, "more_body": False})
            return
        if failure.answer is not None:
            headers = [] if engine is None else self.relay.engine_header(engine)
            raise EngineAnswer(failure.status, failure.message, failure.answer, headers)
        raise OpenAIError(failure.status, failure.message)

    # ------------------------------------------------------------------ helpers

    def _upstream_headers(self, call: Call) -> Headers:
        key = self.ctx.settings.engine_api_key
        engine_key = None if key is None else key.get_secret_value().encode()
        # when the router does not check keys, the engine's own --api-key does
        return upstream_headers(
            call.client_headers, call.ex.request_id, engine_key, not self.ctx.keys.enabled, call.client_host
        )


def _prompt_len(features: RequestFeatures | None) -> int | None:
    """The prompt's length in tokens, when the policy tokenized it."""
    if features is None:
        return None
    if features.prompt_len is not None:
        return features.prompt_len
    return None if features.prompt_token_ids is None else len(features.prompt_token_ids)


# requests that make an engine prefill go through flow control; /tokenize and /detokenize never wait
_FLOW_KINDS: frozenset[Kind] = frozenset({"chat", "completion", "embedding"})

_LIMIT_MESSAGES = {
    "rate_limit": "rate limit exceeded for this API key",
    "key_concurrency": "too many concurrent requests for this API key",
}
