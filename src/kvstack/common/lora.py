"""LoRA adapters: the declared spec, an engine's limits, and a client of vLLM 0.24's runtime API.

One module shared by the engine launcher (which renders the limits), the operator (which places
and loads adapters) and the router (which loads a held request's adapter).

The spec: a model's :class:`LoraSpec` holds the engine limits (vLLM's ``--max-loras``,
``--max-lora-rank``, ``--max-cpu-loras``) and the declared :class:`Adapter` list. Field names are
camelCase in resources and values files and snake_case in Python (both are accepted).
:func:`check_adapters` adds the checks that need the model itself (an adapter named like the model).

The client: :class:`LoraClient` calls one engine's runtime endpoints, which vLLM 0.24 serves only
with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` (and ``--enable-lora``):

- ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}``: 200 with a plain-text success line;
  400 ``InvalidUserInput`` for a missing field or a name already loaded ("has already been
  loaded"); 404 ``NotFoundError`` when nothing is found at the path ("No adapter found for ...");
  500 ``InternalServerError`` when the engine refuses the adapter (a rank over ``max_lora_rank``,
  bad weights).
- ``POST /v1/unload_lora_adapter {"lora_name"}``: 200; 404 ``NotFoundError`` ("cannot be found");
  500 when the engine fails to remove it.
- ``GET /v1/models``: the base model(s), then one card per loaded adapter with ``parent`` set.

Without the environment variable the two routes do not exist: FastAPI's own 404
``{"detail": "Not Found"}``, which is told apart from vLLM's OpenAI-shaped 404. Every failure is a
:class:`LoraError` with a typed ``kind``; :func:`error_for` is the pure mapping.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

# A name clients send as ``model``: what vLLM accepts and what is safe in a label value and a URL.
ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
MaxLoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]  # vLLM 0.24's MaxLoRARanks
MAX_LORA_RANKS: tuple[int, ...] = get_args(MaxLoraRank)
SourceKind = Literal["hub", "path", "url"]
# The environment variable that opens the runtime endpoints.
RUNTIME_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"

_URL = re.compile(r"^https?://[^\s/]+(/\S*)?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# The three forms, for schemas (the API server checks it too); source_kind() adds the ``..`` check.
SOURCE_PATTERN = r"^(https?://\S+|/\S*|[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)$"
_SOURCE_HELP = (
    "source must be a Hugging Face Hub repo id (org/name), an absolute path on the model volume "
    "(/models/...), or an http(s) URL"
)


def source_kind(source: str) -> SourceKind | None:
    """What ``source`` names, or None when it is none of the three."""
    if _URL.match(source):
        return "url"
    if source.startswith("/") and "\x00" not in source and ".." not in source.split("/"):
        return "path"
    if _HUB_ID.match(source) and ".." not in source:
        return "hub"
    return None


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class Adapter(_Model):
    """One declared adapter of a model."""

    name: str = Field(pattern=ADAPTER_NAME, description="the name clients send as model")
    source: str = Field(
        min_length=1,
        json_schema_extra={"pattern": SOURCE_PATTERN},
        max_length=2048,
        description="Hub repo id (org/name), absolute path on the model volume, or http(s) URL",
    )
    pinned: bool = Field(False, description="loaded on every engine of the model")
    rank: int | None = Field(
        None, ge=1, le=512, description="the adapter's rank, checked against maxLoraRank"
    )

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if source_kind(value) is None:
            raise ValueError(_SOURCE_HELP)
        return value

    @property
    def kind(self) -> SourceKind:
        kind = source_kind(self.source)
        assert kind is not None  # validated
        return kind

    @property
    def lora_path(self) -> str:
        """What the engine's load endpoint gets: vLLM resolves a path, or downloads a Hub repo id.

        A URL goes as it is: vLLM 0.24 itself cannot load one (a LoRA resolver plugin can).
        """
        return self.source


class LoraLimits(_Model):
    """An engine's LoRA limits, as vLLM 0.24's flags take them."""

    max_loras: int = Field(1, ge=1, le=256, description="adapters in one batch (GPU slots)")
    max_lora_rank: MaxLoraRank = Field(16, description="the largest adapter rank the engine accepts")
    max_cpu_loras: int | None = Field(
        None, ge=1, le=4096, description="adapters cached in CPU memory; at least maxLoras (default: it)"
    )

    @model_validator(mode="after")
    def _cpu_holds_gpu(self) -> LoraLimits:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"maxCpuLoras ({self.max_cpu_loras}) must be at least maxLoras ({self.max_loras})"
            )
        return self

    def engine_args(self) -> list[str]:
        """``vllm serve`` flags for these limits (``--enable-lora`` included)."""
        args = [
            "--enable-lora",
            "--max-loras",
            str(self.max_loras),
            "--max-lora-rank",
            str(self.max_lora_rank),
        ]
        if self.max_cpu_loras is not None:
            args += ["--max-cpu-loras", str(self.max_cpu_loras)]
        return args


class LoraSpec(LoraLimits):
    """A model's LoRA section: the engine limits and the declared adapters."""

    adapters: list[Adapter] = Field(default_factory=list, max_length=1024)

    @model_validator(mode="after")
    def _adapters_fit(self) -> LoraSpec:
        seen: set[str] = set()
        for i, adapter in enumerate(self.adapters):
            if adapter.name in seen:
                raise ValueError(f"adapters[{i}].name: {adapter.name!r} is declared twice")
            seen.add(adapter.name)
            if adapter.rank is not None and adapter.rank > self.max_lora_rank:
                raise ValueError(
                    f"adapters[{i}].rank: {adapter.rank} is over maxLoraRank {self.max_lora_rank}"
                )
        return self

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.adapters)

    def adapter(self, name: str) -> Adapter | None:
        return next((a for a in self.adapters if a.name == name), None)


def check_adapters(
    lora: LoraSpec, served_names: Sequence[str], taken: Mapping[str, str] | None = None
) -> None:
    """Checks that need more than the section: ValueError naming the adapter.

    ``served_names`` are the model's own names (an adapter may not shadow its base model);
    ``taken`` maps names already used elsewhere in the stack (other models, their adapters) to
    what uses them.
    """
    for i, adapter in enumerate(lora.adapters):
        if adapter.name in served_names:
            raise ValueError(f"adapters[{i}].name: {adapter.name!r} is the model's own served name")
        if taken and adapter.name in taken:
            raise ValueError(f"adapters[{i}].name: {adapter.name!r} is already {taken[adapter.name]}")


# -- the client ---------------------------------------------------------------------------------

Operation = Literal["load", "unload", "list"]
LoraErrorKind = Literal[
    "already_loaded",  # load: the engine holds an adapter of that name
    "not_loaded",  # unload: the engine holds no adapter of that name
    "source_not_found",  # load: nothing at the adapter's path or repo id
    "disabled",  # the runtime endpoints are off (VLLM_ALLOW_RUNTIME_LORA_UPDATING unset)
    "invalid",  # the engine refused the request itself (400)
    "engine",  # the engine failed to load or remove it (5xx: rank over the limit, bad weights)
    "unreachable",  # no answer: connect error or timeout
    "protocol",  # an answer that is not vLLM's
]


class LoraError(Exception):
    """A runtime LoRA call that failed; ``message`` is what the engine said, or what went wrong."""

    def __init__(self, kind: LoraErrorKind, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.kind: LoraErrorKind = kind
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class LoadedAdapter:
    """An adapter card of ``/v1/models``."""

    name: str
    parent: str
    path: str  # the card's ``root``: the lora_path it was loaded from


def _message(body: bytes) -> tuple[str, bool]:
    """The engine's error message and whether the body is vLLM's (OpenAI-shaped) error."""
    try:
        data: Any = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:500], False
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"], True  # vLLM 0.24: {"error": {message, type, param, code}}
        if data.get("object") == "error" and isinstance(data.get("message"), str):
            return data["message"], True  # older vLLM: the fields at the top
        detail = data.get("detail")
        if isinstance(detail, str):
            return detail, False  # FastAPI's own error: the route itself is missing
    return str(data)[:500], False


def error_for(op: Operation, name: str, status: int, body: bytes) -> LoraError | None:
    """The error an engine's answer means, or None for success. Pure."""
    if 200 <= status < 300:
        return None
    message, from_vllm = _message(body)
    if status == 404 and not from_vllm:
        return LoraError(
            "disabled",
            f"the engine does not serve the runtime LoRA endpoints ({message or 'Not Found'}): "
            f"start it with --enable-lora and {RUNTIME_UPDATING_ENV}=True",
            status=status,
        )
    if op == "load" and status == 400 and "already been loaded" in message:
        return LoraError("already_loaded", message, status=status)
    if op == "load" and status == 404:
        return LoraError("source_not_found", message, status=status)
    if op == "unload" and status == 404:
        return LoraError("not_loaded", message, status=status)
    if status in (400, 422):
        return LoraError("invalid", message or f"HTTP {status}", status=status)
    if status >= 500:
        return LoraError("engine", message or f"HTTP {status}", status=status)
    return LoraError("protocol", f"unexpected HTTP {status} to {op} {name!r}: {message}", status=status)


def adapters_in(models: Any) -> tuple[LoadedAdapter, ...]:
    """The adapter cards (those with ``parent``) of a ``/v1/models`` body. Pure."""
    if not isinstance(models, dict) or not isinstance(models.get("data"), list):
        raise LoraError("protocol", "the engine's /v1/models is not a model list")
    out: list[LoadedAdapter] = []
    for card in models["data"]:
        if not isinstance(card, dict) or not isinstance(card.get("id"), str):
            raise LoraError("protocol", f"a /v1/models card without an id: {card!r:.200}")
        parent = card.get("parent")
        if isinstance(parent, str) and parent:
            out.append(LoadedAdapter(card["id"], parent, str(card.get("root") or "")))
    return tuple(out)


class LoraClient:
    """Runtime adapter calls to any engine, given its base URL (``http://10.1.2.3:8000``).

    One plain httpx client for all engines (a control path: a few calls a minute). Loading reads
    the weights, from a Hub download at worst, hence the long default timeout.
    """

    def __init__(
        self,
        client: httpx.AsyncClient | None = None,
        *,
        timeout: float = 120.0,
        api_key: str | None = None,
    ) -> None:
        self._client = client or httpx.AsyncClient(timeout=timeout, trust_env=False)
        self._owns_client = client is None
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def _call(self, op: Operation, name: str, method: str, url: str, body: Any = None) -> bytes:
        try:
            resp = await self._client.request(method, url, json=body, headers=self._headers)
            content = resp.content
        except httpx.HTTPError as err:
            why = "timed out" if isinstance(err, httpx.TimeoutException) else str(err) or type(err).__name__
            raise LoraError("unreachable", f"cannot {op} adapters at {url}: {why}") from err
        error = error_for(op, name, resp.status_code, content)
        if error is not None:
            raise error
        return content

    async def load(self, engine: str, name: str, path: str) -> None:
        """Load adapter ``name`` from ``path``; LoraError (``already_loaded`` when it is)."""
        body = {"lora_name": name, "lora_path": path}
        await self._call("load", name, "POST", f"{engine.rstrip('/')}/v1/load_lora_adapter", body)

    async def unload(self, engine: str, name: str) -> None:
        """Unload adapter ``name``; LoraError (``not_loaded`` when the engine has none)."""
        body = {"lora_name": name}
        await self._call("unload", name, "POST", f"{engine.rstrip('/')}/v1/unload_lora_adapter", body)

    async def ensure_loaded(self, engine: str, name: str, path: str) -> bool:
        """Load unless already loaded; True when this call loaded it."""
        try:
            await self.load(engine, name, path)
        except LoraError as err:
            if err.kind == "already_loaded":
                return False
            raise
        return True

    async def ensure_unloaded(self, engine: str, name: str) -> bool:
        """Unload unless not loaded; True when this call unloaded it."""
        try:
            await self.unload(engine, name)
        except LoraError as err:
            if err.kind == "not_loaded":
                return False
            raise
        return True

    async def loaded(self, engine: str) -> tuple[LoadedAdapter, ...]:
        """The adapters the engine lists in ``/v1/models``."""
        content = await self._call("list", "", "GET", f"{engine.rstrip('/')}/v1/models")
        try:
            data: Any = json.loads(content)
        except ValueError as err:
            raise LoraError("protocol", f"the engine's /v1/models is not JSON: {err}") from err
        return adapters_in(data)
