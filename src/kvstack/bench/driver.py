"""Replay a workload against an OpenAI-compatible endpoint and record what each request saw.

Open loop: each session starts at its scheduled time whatever the server does, and each next turn
is sent once the previous answer arrived (plus think time), carrying that real answer in its
history. Streams are parsed frame by frame to time the first token and the gaps between tokens.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import httpx

from kvstack.bench import promtext
from kvstack.bench.workloads import Session, Workload
from kvstack.common.waits import wait_until


@dataclass(slots=True)
class RequestResult:
    session_id: str
    turn: int
    sent_at: float  # seconds since the run started
    ok: bool
    status: int = 0
    error: str = ""
    ttft: float | None = None
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    engine: str = ""
    request_id: str = ""  # the router's x-request-id: joins the result to the router's log lines
    messages: list[dict[str, str]] = field(default_factory=list)
    answer: str = ""
    finish_reason: str | None = None


def stream_succeeded(
    finish_reason: str | None, completion_tokens: int, max_tokens: int, error: str
) -> tuple[bool, str]:
    """Whether a streamed request (sent with ``ignore_eos``) really finished, and if not, why.

    An engine can end a stream early without an HTTP error (vLLM fails requests whose KV load from
    LMCache fails: ``finish_reason`` "error", or "abort"); a benchmark must count those as failures.
    """
    if error:
        return False, error
    if finish_reason != "length":
        return False, f"stream ended with finish_reason {finish_reason!r}, expected 'length'"
    if completion_tokens and completion_tokens < max_tokens:
        return False, f"stream ended after {completion_tokens} of {max_tokens} tokens"
    return True, ""


@dataclass(slots=True)
class DriverConfig:
    base_url: str  # e.g. http://127.0.0.1:8000
    model: str
    api_key: str | None = None
    request_timeout: float = 120.0
    max_in_flight: int = 512  # a safety cap, far above what the workloads reach


async def _one_request(
    http: aiohttp.ClientSession,
    cfg: DriverConfig,
    messages: list[dict[str, str]],
    max_tokens: int,
    session: Session,
    turn: int,
    t0: float,
) -> RequestResult:
    body = {
        "model": cfg.model,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
        "user": session.session_id,
    }
    headers = {"x-session-id": session.session_id}
    if cfg.api_key:
        headers["authorization"] = f"Bearer {cfg.api_key}"
    start = time.perf_counter()
    res = RequestResult(session.session_id, turn, start - t0, ok=False, messages=messages)
    parts: list[str] = []
    last = start
    try:
        async with http.post(f"{cfg.base_url}/v1/chat/completions", json=body, headers=headers) as resp:
            res.status = resp.status
            res.engine = resp.headers.get("x-kvstack-engine", "")
            res.request_id = resp.headers.get("x-request-id", "")
            if resp.status != 200:
                res.error = (await resp.text())[:300]
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    res.prompt_tokens = usage.get("prompt_tokens", 0)
                    res.completion_tokens = usage.get("completion_tokens", 0)
                    details = usage.get("prompt_tokens_details") or {}
                    res.cached_tokens = details.get("cached_tokens") or 0
                if "error" in chunk:  # the router's error event on a stream that broke
                    res.error = json.dumps(chunk["error"])[:300]
                for choice in chunk.get("choices", ()):
                    res.finish_reason = choice.get("finish_reason") or res.finish_reason
                    text = (choice.get("delta") or {}).get("content")
                    if not text:
                        continue
                    now = time.perf_counter()
                    if res.ttft is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    parts.append(text)
        res.ok, why = stream_succeeded(res.finish_reason, res.completion_tokens, max_tokens, res.error)
        if not res.ok and not res.error:
            res.error = why
    except (TimeoutError, aiohttp.ClientError, ValueError) as err:
        res.error = f"{type(err).__name__}: {err}"
    res.e2e = time.perf_counter() - start
    res.answer = "".join(parts)
    return res


async def _run_session(
    http: aiohttp.ClientSession,
    cfg: DriverConfig,
    session: Session,
    t0: float,
    gate: asyncio.Semaphore,
    results: list[RequestResult],
    on_done: Callable[[RequestResult], None],
) -> None:
    delay = session.start - (time.perf_counter() - t0)
    if delay > 0:
        await asyncio.sleep(delay)
    history: list[dict[str, str]] = [{"role": "system", "content": session.system}]
    for k, turn in enumerate(session.turns):
        messages = [*history, {"role": "user", "content": turn.user}]
        async with gate:
            res = await _one_request(http, cfg, messages, turn.max_tokens, session, k, t0)
        results.append(res)
        on_done(res)
        if not res.ok:
            return  # a user whose request failed walks away, as in the field benchmarks
        history = [*messages, {"role": "assistant", "content": res.answer}]
        if session.think_time:
            await asyncio.sleep(session.think_time)


async def run_workload(
    cfg: DriverConfig, workload: Workload, on_done: Callable[[RequestResult], None] | None = None
) -> tuple[list[RequestResult], float]:
    """Send every turn of every session; returns the results (completion order) and the wall time."""
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout)
    connector = aiohttp.TCPConnector(limit=cfg.max_in_flight)
    gate = asyncio.Semaphore(cfg.max_in_flight)
    results: list[RequestResult] = []
    callback = on_done or (lambda _r: None)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        t0 = time.perf_counter()
        await asyncio.gather(
            *(_run_session(http, cfg, s, t0, gate, results, callback) for s in workload.sessions)
        )
        wall = time.perf_counter() - t0
    return results, wall


def wait_for_engines(router_url: str, engines: int, timeout: float = 30.0) -> None:
    """Wait until the router routes to all ``engines``.

    Its ``/ready`` answers 200 once one engine is up (right for a pod's readiness), but a case that
    started then would place its first prompts on the engines admitted so far, and a policy that
    keeps a prefix where it first went (the trie) would leave a late engine idle all run.
    """

    def all_routable() -> bool:
        try:
            ready = client.get(f"{router_url}/ready").json()
        except httpx.HTTPError:  # a router still busy starting: asked again until the deadline
            return False
        # and ready: the engines' KV-event history replayed into the index (router/readiness.py)
        return bool(ready.get("available_engines") == engines and ready.get("ready"))

    # one client for the polls: httpx.get builds a client (and its TLS context) per call, ~35 ms of
    # CPU each on the dev machine against ~3 ms, which competes with the router being waited for
    with httpx.Client(timeout=2.0) as client:
        wait_until(all_routable, f"the router to route to all {engines} engines", timeout, interval=0.05)


APPLIED = "kvstack_router_kv_event_batches_applied_total"


def wait_for_events_settled(router_url: str, timeout: float = 120.0, quiet_polls: int = 3) -> float:
    """Wait until the router has applied its engines' KV-event history; returns the batches applied.

    A fresh router replays each engine's whole event buffer (vLLM keeps 10,000 steps): on engines
    with a long history that took seconds of the router's CPU, which a case started meanwhile would
    count as per-request cost and route over a half-built index. Between cases the engines are idle,
    so the replay is done once the applied-batch counter stops moving for ``quiet_polls`` polls.
    """
    seen: list[float] = []

    def settled() -> bool:
        seen.append(promtext.total(promtext.scrape(f"{router_url}/metrics"), APPLIED))
        recent = seen[-quiet_polls:]
        return len(recent) == quiet_polls and len(set(recent)) == 1

    wait_until(settled, "the router's KV-event replay to settle", timeout, interval=0.3)
    return seen[-1]
