"""Static discovery: engine URLs from the command line and/or a reloadable YAML/JSON file.

The file holds a list (or ``{"engines": [...]}``) whose entries are URLs or objects::

    - http://10.0.0.5:8000
    - url: http://10.0.0.6:8000
      name: gpu-node-6
      models: [llama-3-8b]
      kv_events_endpoint: tcp://10.0.0.6:5557
      kv_events_replay_endpoint: tcp://10.0.0.6:5558
      device: node-6/gpu-0   # optional: engines naming one device share its time

It is re-read when its mtime, size or inode changes (polled every ``reload_interval``; a
Kubernetes ConfigMap mount swaps a symlink, which changes the inode) and on SIGHUP. An invalid
file is logged and ignored: the previous set stays. Entries without models learn them from the
engine (see :class:`kvstack.router.monitor.EngineMonitor`).

Usage::

    discovery = StaticDiscovery(registry, urls=["http://127.0.0.1:8101"], file=Path("engines.yaml"))
    await discovery.start()   # loads once (ConfigError on a bad file), then watches the file
    ...
    await discovery.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvstack.common.config import ConfigError, describe_validation_error, read_yaml_file
from kvstack.common.tasks import BackgroundTask
from kvstack.router.engines import Endpoint, EngineRegistry

log = logging.getLogger(__name__)


class EndpointSpec(BaseModel):
    """One engine entry as configured."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    name: str | None = None
    models: list[str] = Field(default_factory=list)
    kv_events_endpoint: str | None = None
    kv_events_replay_endpoint: str | None = None
    device: str | None = Field(None, min_length=1)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        url = url.strip().rstrip("/")
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
            raise ValueError("must be an http(s) base URL such as http://10.0.0.5:8000")
        return url

    @field_validator("kv_events_endpoint", "kv_events_replay_endpoint")
    @classmethod
    def _zmq_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("tcp://", "ipc://")):
            raise ValueError("must be a ZMQ endpoint such as tcp://10.0.0.5:5557")
        return value

    def endpoint(self) -> Endpoint:
        return Endpoint(
            url=self.url,
            name=self.name or self.url,
            models=frozenset(self.models),
            kv_events_endpoint=self.kv_events_endpoint,
            kv_events_replay_endpoint=self.kv_events_replay_endpoint,
            device=self.device,
        )


def sim_engine_entry(
    name: str,
    *,
    http: int,
    kv_events: int,
    kv_replay: int,
    models: Sequence[str] = (),
    host: str = "127.0.0.1",
    device: str | None = None,
) -> dict[str, Any]:
    """The engines-file entry of a simulator (or any engine) on ``host`` that publishes KV events.

    Its URL on port ``http``, its name, its models (none: the router learns them from the engine's
    ``/v1/models``) and both ``tcp://`` KV-event endpoints, publisher on ``kv_events`` and replay on
    ``kv_replay``; ``device`` when it shares an accelerator with others. Built through
    :class:`EndpointSpec`, so it is an entry this module's parser takes.
    """
    spec = EndpointSpec(
        url=f"http://{host}:{http}",
        name=name,
        models=list(models),
        kv_events_endpoint=f"tcp://{host}:{kv_events}",
        kv_events_replay_endpoint=f"tcp://{host}:{kv_replay}",
        device=device,
    )
    return spec.model_dump(exclude_defaults=True)


def parse_endpoints(data: Any, *, source: str) -> list[Endpoint]:
    """A list of URLs/objects (or ``{"engines": [...]}``) -> endpoints; ConfigError naming the entry."""
    if isinstance(data, dict) and set(data) == {"engines"}:
        data = data["engines"]
    if data is None:
        data = []
    if not isinstance(data, list):
        raise ConfigError(f"{source}: expected a list of engines, not {type(data).__name__}")
    endpoints: list[Endpoint] = []
    seen: set[str] = set()
    for i, entry in enumerate(data):
        raw = {"url": entry} if isinstance(entry, str) else entry
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: engines.{i}: expected a URL or a mapping")
        try:
            ep = EndpointSpec(**raw).endpoint()
        except ValidationError as err:
            raise ConfigError(f"{source}: {describe_validation_error(err, prefix=f'engines.{i}.')}") from err
        if ep.url in seen:
            raise ConfigError(f"{source}: engines.{i}.url: {ep.url} is listed twice")
        seen.add(ep.url)
        endpoints.append(ep)
    return endpoints


def load_endpoints_file(path: Path) -> list[Endpoint]:
    """Read and validate an engines file; ConfigError if unreadable or invalid."""
    return parse_endpoints(read_yaml_file(path, "engines file"), source=str(path))


def merge_endpoints(*groups: Iterable[Endpoint]) -> list[Endpoint]:
    """Union keyed by URL; a later group's entry replaces an earlier one with the same URL."""
    merged: dict[str, Endpoint] = {}
    for group in groups:
        for ep in group:
            merged[ep.url] = ep
    return list(merged.values())


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class StaticDiscovery:
    """Keeps the registry equal to the configured URLs plus the file's entries."""

    def __init__(
        self,
        registry: EngineRegistry,
        urls: Sequence[str | Endpoint] = (),
        file: Path | None = None,
        *,
        reload_interval: float = 5.0,
        reload_on_sighup: bool = True,
    ) -> None:
        if reload_interval <= 0:
            raise ConfigError(f"reload_interval: must be > 0 (got {reload_interval!r})")
        self.registry = registry
        self.file = file
        self.reload_interval = reload_interval
        self.reload_on_sighup = reload_on_sighup
        self._fixed = parse_endpoints(
            [u if isinstance(u, str) else _spec_of(u) for u in urls], source="static engine URLs"
        )
        self._signature: tuple[int, int, int] | None = None
        self._file_endpoints: list[Endpoint] = []
        self._watcher = BackgroundTask("static-discovery", self._watch, logger=log)
        self._sighup_installed = False
        self.reloads = 0  # successful loads of the file, for tests and logs

    async def start(self) -> None:
        """Load everything once (a bad file raises ConfigError here), then watch the file."""
        if self.file is not None:
            self._signature = _file_signature(self.file)
            self._file_endpoints = load_endpoints_file(self.file)
            self.reloads += 1
        self._publish()
        if self.file is None or self._watcher.running:
            return
        self._watcher.start()
        if self.reload_on_sighup:
            loop = asyncio.get_running_loop()
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                # only possible from the main thread of a Unix process
                loop.add_signal_handler(signal.SIGHUP, self.reload)
                self._sighup_installed = True

    async def stop(self) -> None:
        if self._sighup_installed:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup_installed = False
        await self._watcher.stop()

    async def run(self) -> None:
        """``start()`` and watch until cancelled."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    def reload(self) -> bool:
        """Re-read the file now; keep the previous set (and log why) if it is invalid."""
        if self.file is None:
            return False
        self._signature = _file_signature(self.file)
        try:
            endpoints = load_endpoints_file(self.file)
        except ConfigError as err:
            log.error("keeping the previous engines: %s", err)
            return False
        self._file_endpoints = endpoints
        self.reloads += 1
        self._publish()
        return True

    def _publish(self) -> None:
        added, removed = self.registry.sync(merge_endpoints(self._fixed, self._file_endpoints))
        for st in added:
            log.info("engine added: %s (%s)", st.name, st.url)
        for st in removed:
            log.info("engine removed: %s (%s)", st.name, st.url)

    async def _watch(self) -> None:
        assert self.file is not None
        while True:
            await asyncio.sleep(self.reload_interval)
            signature = await asyncio.to_thread(_file_signature, self.file)
            if signature != self._signature:
                if signature is None:
                    log.error("engines file %s is gone; keeping the previous engines", self.file)
                    self._signature = None
                    continue
                self.reload()


def _spec_of(ep: Endpoint) -> dict[str, Any]:
    return {
        "url": ep.url,
        "name": ep.name,
        "models": sorted(ep.models),
        "kv_events_endpoint": ep.kv_events_endpoint,
        "kv_events_replay_endpoint": ep.kv_events_replay_endpoint,
    }


__all__ = [
    "EndpointSpec",
    "StaticDiscovery",
    "load_endpoints_file",
    "merge_endpoints",
    "parse_endpoints",
    "sim_engine_entry",
]
