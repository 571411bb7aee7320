"""The flow benchmark's open-loop client: multi-round chats with tenant and priority headers.

Like :mod:`kvstack.bench.driver` (each user arrives at its scheduled time, each next turn follows
the previous answer plus think time), with what a saturated cluster needs:

- a refused request is retried as the official ``openai`` SDK retries it (``retries`` times, 2 by
  default as the SDK's ``max_retries``; :mod:`kvstack.bench.flow_retry`: the router's Retry-After,
  or a backoff), and only a request still refused after them is an outcome of its own: the user
  then goes on to the next turn after the think time, without the refused one (so every policy is
  offered the same turns; ``retries=0`` is the client before retries);
- every request carries its stream's tenant and class headers.

Each request records its attempts, its TTFT from the user's first attempt (what the user sees,
retry waits included) and from its last attempt (what the router admitted), and whether its user
had a served turn before it (if not, the user's document is on no engine yet: a cold turn). Times
come back in simulated seconds (wall seconds x ``speed``).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import aiohttp

from kvstack.bench import flow_retry
from kvstack.bench.flow_plan import Outcome, Stream
from kvstack.bench.workloads import Session


@dataclass(frozen=True, slots=True)
class Client:
    base_url: str
    model: str
    speed: float  # the simulators' speed: wall seconds x speed = simulated seconds
    retries: int = 2  # retries of a refused request (the openai SDK's default max_retries)
    tenant_header: str = "x-kvstack-tenant"
    priority_header: str = "x-kvstack-priority"
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")


@dataclass(frozen=True, slots=True)
class _Turn:
    """One turn's request as its user sends it (again, on a retry)."""

    stream: Stream
    session: Session
    messages: list[dict[str, str]]
    max_tokens: int
    index: int  # the turn's place in its session, from 0
    cold: bool  # no earlier turn of this user was served


async def _attempt(
    http: aiohttp.ClientSession, client: Client, turn: _Turn, t0: float
) -> tuple[Outcome, str]:
    """One attempt of ``turn``: its outcome (times since ``t0``, TTFT from this attempt) and answer."""
    stream, session = turn.stream, turn.session
    headers = {client.tenant_header: stream.tenant, "x-session-id": session.session_id}
    if stream.klass:
        headers[client.priority_header] = stream.klass
    body = {
        "model": client.model,
        "messages": turn.messages,
        "max_tokens": turn.max_tokens,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    sent = (start - t0) * client.speed
    klass = stream.klass or "default"
    status, ttft, done, tokens, parts = 0, None, False, 0, []
    engine: str | None = None
    admission: str | None = None
    predicted: float | None = None
    try:
        async with http.post(f"{client.base_url}/v1/chat/completions", json=body, headers=headers) as resp:
            status = resp.status
            engine = resp.headers.get("x-kvstack-engine")
            admission = resp.headers.get("x-kvstack-admission")
            if (ms := resp.headers.get("x-kvstack-predicted-ttft-ms")) is not None:
                predicted = int(ms) / 1000 * client.speed  # the router's wall seconds, simulated
            if status != 200:
                await resp.read()
                got = resp.headers
                retry = flow_retry.retry_after_s(got.get("retry-after"), got.get("retry-after-ms"))
                return Outcome(stream.tenant, klass, sent, status, False, None, retry), ""
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                if line[6:] == b"[DONE]":
                    break
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens", 0)
                for choice in chunk.get("choices", ()):
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if ttft is None:
                            ttft = (time.perf_counter() - start) * client.speed
                        parts.append(text)
                    if choice.get("finish_reason") == "length":
                        done = True
    except (TimeoutError, aiohttp.ClientError, ValueError):
        pass  # status stays what the response said (0 if none came): an error, not a refusal
    ok = done and tokens == turn.max_tokens
    outcome = Outcome(
        stream.tenant,
        klass,
        sent,
        status,
        ok,
        ttft,
        engine=engine,
        admission=admission,
        predicted_ttft_s=predicted,
    )
    return outcome, "".join(parts)


async def _request(
    http: aiohttp.ClientSession, client: Client, turn: _Turn, t0: float, rng: random.Random
) -> tuple[Outcome, str]:
    """``turn`` with its retries: the last attempt's outcome, with the attempts, the refusals and
    the TTFT from the first attempt recorded on it."""
    outcome, answer = await _attempt(http, client, turn, t0)
    first_sent, refused, retries_done = outcome.sent_s, int(outcome.status == 429), 0
    while retries_done < client.retries and flow_retry.retryable(outcome.status):
        # the header is in the router's (wall) seconds; the wait rule in the user's (simulated)
        header = outcome.retry_after_s
        wait = flow_retry.retry_wait_s(
            None if header is None else header * client.speed, retries_done, rng.random()
        )
        await asyncio.sleep(wait / client.speed)
        outcome, answer = await _attempt(http, client, turn, t0)
        refused += outcome.status == 429
        retries_done += 1
    user_ttft = None if outcome.ttft_s is None else outcome.sent_s - first_sent + outcome.ttft_s
    recorded = replace(
        outcome,
        attempts=retries_done + 1,
        refusals=refused,
        first_sent_s=first_sent,
        user_ttft_s=user_ttft,
        turn=turn.index,
        cold=turn.cold,
        user=turn.session.session_id,
    )
    return recorded, answer


async def _user(
    http: aiohttp.ClientSession,
    client: Client,
    stream: Stream,
    session: Session,
    t0: float,
    out: list[Outcome],
) -> None:
    delay = session.start / client.speed - (time.perf_counter() - t0)
    if delay > 0:
        await asyncio.sleep(delay)
    rng = random.Random(zlib.crc32(session.session_id.encode()))  # the backoff's jitter, seeded
    history: list[dict[str, str]] = [{"role": "system", "content": session.system}]
    served = False
    for index, step in enumerate(session.turns):
        messages = [*history, {"role": "user", "content": step.user}]
        turn = _Turn(stream, session, messages, step.max_tokens, index, cold=not served)
        outcome, answer = await _request(http, client, turn, t0, rng)
        out.append(outcome)
        if outcome.ok:
            served = True
            history = [*messages, {"role": "assistant", "content": answer}]
        await asyncio.sleep(session.think_time / client.speed)


async def run_trace(client: Client, trace: Sequence[tuple[Stream, Session]]) -> tuple[list[Outcome], float]:
    """Every turn of every session; returns the outcomes and the run's length in simulated seconds."""
    timeout = aiohttp.ClientTimeout(total=client.timeout_s)
    connector = aiohttp.TCPConnector(limit=0)
    out: list[Outcome] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(_user(http, client, s, session, t0, out) for s, session in trace))
        wall = time.perf_counter() - t0
    return out, wall * client.speed
