"""A fresh cache before each ``kvstack bench gpu`` case: the engines idle, their GPU prefix caches
reset, the shared Redis flushed.

vLLM 0.24 serves ``POST /reset_prefix_cache`` only with ``VLLM_SERVER_DEV_MODE=1`` (``kvstack
engine serve``'s ``dev_mode: true``), and answers 200 without checking that the reset happened:
the scheduler refuses it while any block is in use (it logs "Failed to reset prefix cache because
some blocks (N) are not freed yet"). So the engines must be idle first: no request running or
waiting, and no KV block held (``vllm:kv_cache_usage_perc`` counts the blocks requests hold, not
the cached free ones; a connector still saving a finished request's blocks holds them).

``reset_external=true`` asks the KV connector to reset too; LMCache 0.5.3's ``LMCacheConnectorV1``
does not implement that, so its CPU tier survives (the plan gives every router its own prompt
prefix for that reason, ``gpu_plan``). The simulator answers the route like vLLM: it empties the
GPU cache and leaves its LMCache tiers alone; it refuses (500) while requests run.

LMCache's own internal API empties the CPU tier: ``DELETE /cache/clear?locations=LocalCPUBackend``
on the engine worker's port (``LMCACHE_INTERNAL_API_SERVER_ENABLED=true``, port
``LMCACHE_INTERNAL_API_SERVER_PORT_START`` + 1; the scheduler's, at + 0, has no cache to clear).
With ``--lmcache-api`` a case starts with that tier empty as well, so nothing a case finds there
comes from an earlier one, and a tier filled by earlier cases (full: every store evicts first)
does not slow a later one. The simulator serves the same route on its own port. It skips chunks
pinned by a lookup in flight, which an idle engine has none of.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import httpx
import redis
import typer

from kvstack.bench import promtext
from kvstack.bench.option_error import OptionError
from kvstack.common.waits import wait_until

# `bench gpu` and `bench flow` over running engines: the same switch, the same meaning
FreshCacheOption = Annotated[
    bool | None,
    typer.Option(
        "--fresh-cache/--keep-cache",
        help="Before every case: wait for idle engines, POST /reset_prefix_cache to each (vLLM: "
        "dev_mode / VLLM_SERVER_DEV_MODE=1) and FLUSHALL --redis-url. Default: on for a `bench gpu` "
        "matrix and for `bench flow` over running engines.",
    ),
]

LMCacheApiOption = Annotated[
    list[str] | None,
    typer.Option(
        "--lmcache-api",
        help="With --fresh-cache: an engine's LMCache internal API (http://HOST:PORT, the worker's "
        "port), emptied of its CPU tier before every case (DELETE /cache/clear); repeat for each "
        "engine. A simulator serves it on its own URL.",
    ),
]


def check_lmcache_api(lmcache_apis: Sequence[str] | None, *, cases_reset: bool) -> None:
    """``bench gpu``'s and ``bench flow``'s one rule for ``--lmcache-api``: it empties the tiers as
    part of a case's fresh cache, so it needs cases that are reset (``--fresh-cache``; ``bench
    flow`` resets only engines of ``--engines-file``). Raises typer's usage error naming it."""
    if lmcache_apis and not cases_reset:
        raise OptionError(
            "--lmcache-api",
            "empties LMCache's CPU tiers as part of each case's fresh cache: needs --fresh-cache "
            "(bench flow: over --engines-file)",
        )


IN_FLIGHT = ("vllm:num_requests_running", "vllm:num_requests_waiting")
KV_USAGE = "vllm:kv_cache_usage_perc"


class ResetError(RuntimeError):
    """An engine or the Redis could not be reset; the message says which and how to fix it."""


def in_flight(url: str) -> float:
    """Requests running or waiting on the engine at ``url``, from its metrics."""
    samples = promtext.scrape(f"{url}/metrics")
    return sum(promtext.total(samples, name) for name in IN_FLIGHT)


def idle(url: str) -> bool:
    """No request running or waiting on the engine at ``url`` and no KV block held."""
    samples = promtext.scrape(f"{url}/metrics")
    busy = sum(promtext.total(samples, name) for name in IN_FLIGHT)
    return busy == 0 and promtext.total(samples, KV_USAGE) == 0


def wait_idle(urls: Sequence[str], timeout_s: float = 120.0) -> None:
    """Until every engine is idle (a cancelled stream may finish late, a connector save hold blocks)."""
    try:
        wait_until(lambda: all(idle(u) for u in urls), f"engines idle: {', '.join(urls)}", timeout_s)
    except AssertionError as err:  # wait_until's timeout: the engines serve someone else's traffic
        raise ResetError(str(err)) from None


def reset_prefix_cache(url: str) -> None:
    """Empty the GPU prefix cache of the engine at ``url`` (and ask its connector to reset too)."""
    try:
        r = httpx.post(f"{url}/reset_prefix_cache", params={"reset_external": "true"}, timeout=30.0)
    except httpx.HTTPError as err:
        raise ResetError(f"{url}: POST /reset_prefix_cache failed: {err}") from err
    if r.status_code == 404:
        raise ResetError(
            f"{url} does not serve POST /reset_prefix_cache: start it with `dev_mode: true` "
            "(VLLM_SERVER_DEV_MODE=1), or run with --keep-cache"
        )
    if r.status_code != 200:
        raise ResetError(f"{url}: POST /reset_prefix_cache answered {r.status_code}: {r.text[:200]}")


def clear_lmcache_cpu(api_url: str) -> int:
    """Empty the LMCache CPU tier behind the internal API at ``api_url``; the tokens it removed."""
    try:
        r = httpx.delete(f"{api_url}/cache/clear", params={"locations": "LocalCPUBackend"}, timeout=60.0)
    except httpx.HTTPError as err:
        raise ResetError(
            f"{api_url}: DELETE /cache/clear failed ({err}): start the engine with "
            "LMCACHE_INTERNAL_API_SERVER_ENABLED=true and pass the worker's port "
            "(LMCACHE_INTERNAL_API_SERVER_PORT_START + 1), or leave out --lmcache-api"
        ) from err
    if r.status_code != 200:
        raise ResetError(f"{api_url}: DELETE /cache/clear answered {r.status_code}: {r.text[:200]}")
    try:
        return int(r.json()["num_removed"])
    except (ValueError, KeyError, TypeError) as err:
        raise ResetError(f"{api_url}: DELETE /cache/clear answered {r.text[:200]!r}") from err


def flush_redis(url: str) -> None:
    """FLUSHALL the Redis at ``url``: LMCache's shared tier starts empty."""
    client = redis.Redis.from_url(url, socket_timeout=10.0)
    try:
        client.flushall()
    except redis.RedisError as err:
        raise ResetError(f"{url}: FLUSHALL failed: {err}") from err
    finally:
        client.close()


def fresh_cache(urls: Sequence[str], redis_url: str | None, lmcache_apis: Sequence[str] = ()) -> None:
    """Every engine idle and its GPU prefix cache empty, the LMCache CPU tiers behind
    ``lmcache_apis`` empty; then the shared Redis, if any, flushed."""
    wait_idle(urls)
    for url in urls:
        reset_prefix_cache(url)
    for api in lmcache_apis:
        clear_lmcache_cpu(api)
    if redis_url is not None:
        flush_redis(redis_url)
