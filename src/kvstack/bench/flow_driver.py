"""The flow benchmark's open-loop client: multi-round chats with tenant and priority headers.

Like :mod:`kvstack.bench.driver` (each user arrives at its scheduled time, each next turn follows
the previous answer plus think time), with two differences a saturated cluster needs: a refused
turn (429) is recorded with its ``Retry-After`` and the user goes on to the next turn after the
think time (so every policy is offered the same requests, and a refusal is an outcome, not an
end), and every request carries its stream's tenant and class headers. Times come back in
simulated seconds (wall seconds x ``speed``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from kvstack.bench.flow_plan import Outcome, Stream
from kvstack.bench.workloads import Session


@dataclass(frozen=True, slots=True)
class Client:
    base_url: str
    model: str
    speed: float  # the simulators' speed: wall seconds x speed = simulated seconds
    tenant_header: str = "x-kvstack-tenant"
    priority_header: str = "x-kvstack-priority"
    timeout_s: float = 600.0


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


async def _one(
    http: aiohttp.ClientSession,
    client: Client,
    stream: Stream,
    session: Session,
    messages: list[dict[str, str]],
    max_tokens: int,
    t0: float,
) -> tuple[Outcome, str]:
    headers = {client.tenant_header: stream.tenant, "x-session-id": session.session_id}
    if stream.klass:
        headers[client.priority_header] = stream.klass
    body = {
        "model": client.model,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    sent = (start - t0) * client.speed
    klass = stream.klass or "default"
    status, ttft, done, tokens, parts = 0, None, False, 0, []
    engine: str | None = None
    try:
        async with http.post(f"{client.base_url}/v1/chat/completions", json=body, headers=headers) as resp:
            status = resp.status
            engine = resp.headers.get("x-kvstack-engine")
            if status != 200:
                await resp.read()
                retry = _retry_after(resp.headers.get("retry-after"))
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
    ok = done and tokens == max_tokens
    return Outcome(stream.tenant, klass, sent, status, ok, ttft, engine=engine), "".join(parts)


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
    history: list[dict[str, str]] = [{"role": "system", "content": session.system}]
    for turn in session.turns:
        messages = [*history, {"role": "user", "content": turn.user}]
        outcome, answer = await _one(http, client, stream, session, messages, turn.max_tokens, t0)
        out.append(outcome)
        if outcome.ok:
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
