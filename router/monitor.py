"""Active health probes, metric scrapes and model discovery for every engine in the registry.

Per engine, two loops run on the router's event loop: a probe loop (``GET /health``; N failures
mark the engine unhealthy and end the requests in flight there, M successes bring it back; a probe
that times out while the engine is answering our requests is ``busy``, not a failure; probes never
end a passive ejection, see :mod:`kvstack.router.ejection`) and a scrape loop
(``GET /metrics/`` asking for the samples the router reads, or the whole ``/metrics`` where that
does not work; parsed by :mod:`kvstack.router.scrape`, unchanged scrapes skipped). Endpoints
that list no models learn them from ``GET /v1/models`` after a successful probe, and again every
``models_interval`` (LoRA adapters come and go). Every GET goes through
:class:`kvstack.router.fetch.EngineFetch` (aiohttp, on a pool of its own).
Scraped figures older than ``stale_after`` are set back to None, so policies never act on them.

Wiring, in the app's lifespan::

    registry = EngineRegistry()
    client = EngineFetch()
    discovery = StaticDiscovery(registry, urls=["http://127.0.0.1:8101"])
    monitor = EngineMonitor(registry, client, build(MonitorConfig, "monitor", probe_interval=2.0))
    await discovery.start()
    monitor.start()
    try:
        yield
    finally:
        await monitor.stop()
        await discovery.stop()
        await client.aclose()
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from kvstack.common.tasks import BackgroundTask
from kvstack.router.engines import Endpoint, EngineRegistry, EngineState
from kvstack.router.fetch import EngineFetch, FetchError
from kvstack.router.probe_rules import ProbeTrack, judge_probe, probe_result
from kvstack.router.queue_wait import queue_wait_s
from kvstack.router.scrape import EngineMetrics, ScrapeParser

log = logging.getLogger(__name__)

# no answer, a non-2xx one, or a body that is not what was asked (ValueError: a malformed scrape
# or model list)
_FETCH_ERRORS = (FetchError, ValueError)


class MonitorConfig(BaseModel):
    """Probe and scrape settings. Build with ``kvstack.common.config.build`` to fail at start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    probe_interval: float = Field(2.0, gt=0, description="seconds between /health probes")
    probe_timeout: float = Field(1.0, gt=0)
    unhealthy_threshold: int = Field(3, ge=1, description="consecutive failed probes to mark unhealthy")
    healthy_threshold: int = Field(2, ge=1, description="consecutive good probes to re-admit")
    scrape_interval: float = Field(1.0, gt=0, description="seconds between /metrics scrapes")
    scrape_timeout: float = Field(1.0, gt=0)
    stale_after: float | None = Field(None, gt=0, description="drop scraped figures older than this")
    models_interval: float = Field(30.0, gt=0, description="seconds between /v1/models refreshes")
    api_key: SecretStr | None = Field(None, description="bearer token for the engines' /v1/models")
    learn_adapters: bool = Field(
        False,
        description="also read /v1/models of engines whose models discovery names, for their LoRA adapters "
        "(on when the router has declared adapters)",
    )

    @model_validator(mode="after")
    def _stale_after_covers_a_scrape(self) -> MonitorConfig:
        if self.stale_after is not None and self.stale_after <= self.scrape_interval:
            raise ValueError("stale_after must be longer than scrape_interval")
        return self

    @property
    def max_scrape_age(self) -> float:
        """How old scraped figures may get: ``stale_after``, or three scrape intervals."""
        return self.stale_after if self.stale_after is not None else 3 * self.scrape_interval


# ---- pure decisions (probe rules: kvstack.router.probe_rules) -------------------------------


def scrape_is_fresh(state: EngineState, now: float, max_age: float) -> bool:
    """Whether ``state``'s scraped figures are recent enough to route on."""
    return state.last_scrape > 0 and now - state.last_scrape <= max_age


def apply_metrics(state: EngineState, metrics: EngineMetrics, now: float) -> None:
    """Copy one scrape into ``state`` (per-model figures go to ``extra`` as ``field:model``)."""
    state.num_running = metrics.num_running
    state.num_waiting = metrics.num_waiting
    state.kv_cache_usage = metrics.kv_cache_usage
    if metrics.block_size is not None:
        state.block_size = metrics.block_size
    if metrics.num_gpu_blocks is not None:
        state.num_gpu_blocks = metrics.num_gpu_blocks
    extra: dict[str, float] = dict(metrics.counters)
    state.queue_wait_s = queue_wait_s(state.extra, extra, metrics.num_waiting, state.queue_wait_s)
    if len(metrics.by_model) > 1:
        for model, m in metrics.by_model.items():
            extra[f"num_running:{model}"] = m.num_running
            extra[f"num_waiting:{model}"] = m.num_waiting
            extra[f"kv_cache_usage:{model}"] = m.kv_cache_usage
    state.extra = extra
    state.last_scrape = now


def clear_metrics(state: EngineState) -> None:
    """Forget scraped load figures (they are stale). Cache geometry is static and kept."""
    state.num_running = None
    state.num_waiting = None
    state.kv_cache_usage = None
    state.queue_wait_s = 0.0
    state.extra = {}


def model_ids(payload: Any) -> frozenset[str]:
    """Model ids from an OpenAI ``/v1/models`` body; ValueError if it is not one."""
    return model_cards(payload)[0]


def model_cards(payload: Any) -> tuple[frozenset[str], dict[str, str]]:
    """(every model id, LoRA adapter -> parent) from an OpenAI ``/v1/models`` body.

    vLLM lists a loaded adapter as a card whose ``parent`` is its base model; ValueError if the body
    is not a model list.
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise ValueError("not an OpenAI model list")
    ids: set[str] = set()
    parents: dict[str, str] = {}
    for card in payload["data"]:
        if not isinstance(card, dict):
            continue
        name, parent = card.get("id"), card.get("parent")
        if not isinstance(name, str) or not name:
            continue
        ids.add(name)
        if isinstance(parent, str) and parent and parent != name:
            parents[name] = parent
    return frozenset(ids), parents


# ---- I/O -----------------------------------------------------------------------------------------


class EngineMonitor:
    """Keeps every registered engine's health, load figures and model list up to date."""

    def __init__(
        self,
        registry: EngineRegistry,
        client: EngineFetch,
        config: MonitorConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.client = client
        self.config = config or MonitorConfig()
        self._clock = clock
        self._tracks: dict[str, ProbeTrack] = {}
        self._models_at: dict[str, float] = {}
        self._models_of: dict[str, Endpoint] = {}  # the endpoint each model list was learnt for
        self._parsers: dict[str, ScrapeParser] = {}  # per engine: its last scrape, not parsed twice
        self._workers: dict[str, list[asyncio.Task[None]]] = {}
        self._probed: set[str] = set()  # probed once at least (and, if it answered, its models asked)
        self._a_probe_ended = asyncio.Event()
        self._loop = BackgroundTask("engine-monitor", self.run, logger=log)

    @property
    def scraped_whole(self) -> frozenset[str]:
        """The engines scraped at their whole ``/metrics`` (their filtered scrape did not work)."""
        return frozenset(url for url, parser in self._parsers.items() if not parser.filtered)

    # lifecycle

    def start(self) -> None:
        """Start monitoring in the background (idempotent)."""
        self._loop.start()

    async def stop(self) -> None:
        """Stop every loop and wait for them to end."""
        await self._loop.stop()

    async def settled(self) -> None:
        """Wait until every engine registered now has had its first probe (bound it with a timeout).

        A router that took requests before its first round would answer them 503 ("still learning
        which models its engines serve") for the round trip of one probe: in a restart, clients
        would see 503s from a router in front of healthy engines. Until the port is served,
        connections are refused (or wait in the listen backlog) instead.
        """
        while any(st.url not in self._probed for st in self.registry.all()):
            self._a_probe_ended.clear()
            await self._a_probe_ended.wait()

    async def run(self) -> None:
        """Follow registry membership, one probe and one scrape loop per engine, until cancelled."""
        generation = -1
        try:
            while True:
                if generation != self.registry.generation:
                    generation = self.registry.generation
                    await self._reconcile()
                await self.registry.next_generation(generation)
        finally:
            await self._cancel(list(self._workers))

    async def _reconcile(self) -> None:
        urls = {st.url for st in self.registry.all()}
        await self._cancel([url for url in self._workers if url not in urls])
        for url in urls - self._workers.keys():
            self._workers[url] = [
                asyncio.create_task(self._probe_loop(url), name=f"probe {url}"),
                asyncio.create_task(self._scrape_loop(url), name=f"scrape {url}"),
            ]

    async def _cancel(self, urls: list[str]) -> None:
        tasks = [task for url in urls for task in self._workers.pop(url, [])]
        for url in urls:
            self._tracks.pop(url, None)
            self._models_at.pop(url, None)
            self._models_of.pop(url, None)
            self._parsers.pop(url, None)
            self._probed.discard(url)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _probe_loop(self, url: str) -> None:
        await self._every(url, self.config.probe_interval, self.probe_once)

    async def _scrape_loop(self, url: str) -> None:
        await self._every(url, self.config.scrape_interval, self.scrape_once)

    async def _every(self, url: str, interval: float, step: Callable[[EngineState], Any]) -> None:
        while (state := self.registry.get(url)) is not None:
            started = self._clock()
            try:
                await step(state)
            except Exception:  # a monitor loop must outlive any surprise from one engine
                log.exception("monitoring %s failed", url)
            await asyncio.sleep(max(0.0, started + interval - self._clock()))

    # one-shot steps (public: the proxy may probe at once after a passive failure)

    async def probe_once(self, state: EngineState) -> bool:
        """Probe ``/health`` once and update health and (when due) the model list."""
        cfg = self.config
        ok, timed_out = await self._health_ok(state.url)
        now = self._clock()
        window = cfg.probe_interval + cfg.probe_timeout
        result = probe_result(
            answered=ok, timed_out=timed_out, last_answer=state.last_answer, now=now, window=window
        )
        if result == "busy":
            log.info("engine %s: /health not answered in time while it answers requests: busy", state.name)
        verdict = judge_probe(
            self._tracks.get(state.url, ProbeTrack()),
            result=result,
            healthy=state.healthy,
            unhealthy_threshold=cfg.unhealthy_threshold,
            healthy_threshold=cfg.healthy_threshold,
        )
        self._tracks[state.url] = verdict.track
        if verdict.healthy != state.healthy:
            log.warning("engine %s is now %s", state.name, "healthy" if verdict.healthy else "unhealthy")
            if verdict.healthy:
                state.healthy = True
            else:
                # requests waiting on it would wait for the idle timeout (minutes): end them now
                if state.on_down:
                    log.warning("ending %d requests in flight on %s", len(state.on_down), state.name)
                state.declare_down()
            self.registry.changed()
        if ok and self._models_due(state, now):
            await self.refresh_models(state)
        self._probed.add(state.url)
        self._a_probe_ended.set()
        return ok

    async def scrape_once(self, state: EngineState) -> bool:
        """Scrape the engine's metrics once; on failure, drop figures that have gone stale."""
        metrics: EngineMetrics | None = None
        parser = self._parsers.setdefault(state.url, ScrapeParser())
        try:
            metrics = await self._scrape(state, parser)
            if parser.filtered and metrics.num_running is None:  # an answer without the samples asked
                metrics = await self._unfiltered(state, parser, "answered without the samples asked")
        except FetchError as err:
            if parser.filtered and err.status is not None:  # no filtering route: a 404, a redirect
                metrics = await self._unfiltered(state, parser, str(err))
            else:
                log.debug("scrape of %s failed: %s", state.url, err)
        except ValueError as err:
            log.debug("scrape of %s failed: %s", state.url, err)
        now = self._clock()
        if metrics is not None:
            apply_metrics(state, metrics, now)
            return True
        if state.num_running is not None and not scrape_is_fresh(state, now, self.config.max_scrape_age):
            log.info("metrics of %s are stale; ignoring them until the next good scrape", state.name)
            clear_metrics(state)
        return False

    async def _scrape(self, state: EngineState, parser: ScrapeParser) -> EngineMetrics:
        text = await self.client.get_text(state.url + parser.path, within=self.config.scrape_timeout)
        return parser.parse(text)

    async def _unfiltered(self, state: EngineState, parser: ScrapeParser, why: str) -> EngineMetrics | None:
        """Scrape ``state`` whole from now on (its filtered scrape did not work: ``why``)."""
        log.info("%s: scraping its whole /metrics (the filtered scrape %s)", state.name, why)
        parser.filtered = False
        try:
            return await self._scrape(state, parser)
        except _FETCH_ERRORS as err:
            log.debug("scrape of %s failed: %s", state.url, err)
            return None

    async def refresh_models(self, state: EngineState) -> bool:
        """Learn the served models from ``/v1/models``; keep the previous list on failure."""
        headers = {}
        key = self.config.api_key
        if key is not None:
            # a config updated with model_copy() may hold a plain str: accept both
            secret = key.get_secret_value() if isinstance(key, SecretStr) else str(key)
            headers["Authorization"] = f"Bearer {secret}"
        try:
            payload = await self.client.get_json(
                state.url + "/v1/models", within=self.config.probe_timeout, headers=headers
            )
            models, adapters = model_cards(payload)
        except _FETCH_ERRORS as err:
            log.warning("cannot list the models of %s: %s", state.url, err)
            return False
        self._models_at[state.url] = self._clock()
        self._models_of[state.url] = state.endpoint
        if state.endpoint.models:  # discovery named the base models: learn only the adapters
            models = state.endpoint.models | adapters.keys()
        if models != state.models or adapters != state.adapters:
            log.info("engine %s serves %s", state.name, ", ".join(sorted(models)) or "no models")
            state.models = models
            state.adapters = adapters
            self.registry.changed()
        return True

    def _models_due(self, state: EngineState, now: float) -> bool:
        if state.endpoint.models and not self.config.learn_adapters:
            return False  # discovery named them
        if self._models_of.get(state.url) != state.endpoint:
            return True  # new, or another pod took over the address: its models may differ
        last = self._models_at.get(state.url, 0.0)
        if state.endpoint.models:  # named by discovery: only adapters can change
            return now - last >= self.config.models_interval
        return not state.models or now - last >= self.config.models_interval

    async def _health_ok(self, url: str) -> tuple[bool, bool]:
        """(ok, timed out): a probe succeeds on a 2xx answer, body and all, within ``probe_timeout``."""
        try:
            await self.client.get(url + "/health", within=self.config.probe_timeout)
        except FetchError as err:
            return False, err.timed_out
        return True, False
