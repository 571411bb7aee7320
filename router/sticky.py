"""Which engine holds a stored response: ``/v1/responses`` follow-ups go back to it.

vLLM 0.24 keeps a stored response (``store``, with ``VLLM_ENABLE_RESPONSES_API_STORE``) in the
memory of the engine that produced it: ``GET /v1/responses/{id}``, ``POST /v1/responses/{id}/cancel``
and a new response naming it as ``previous_response_id`` work only there. The router learns
``response id -> engine URL`` from each ``/v1/responses`` answer it relays:

1. a whole JSON answer: the ``id`` at the top of the body (vLLM writes it first); only the first
   :data:`HEAD_BYTES` are looked at, the body is never parsed;
2. a stream: the ``response.created`` event, the first of vLLM's stream, carries ``response.id``;
   only frames before an id was found are looked at.

The map is bounded: least recently used first out past ``max_entries``, and an entry older than
``ttl_s`` is forgotten (vLLM's own store is in memory and lost with the pod). An id the router does
not know is answered 404 as vLLM answers an unknown id; a ``previous_response_id`` it does not know
is routed as any request (the engine answers it).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from kvstack.common.errors import OpenAIError

HEAD_BYTES = 256  # vLLM's ResponsesResponse begins with its id
# the first "id" key at the top of a JSON body; vLLM ids are "resp_" + hex (the simulator's too)
_TOP_ID = re.compile(rb'^\s*\{\s*"id"\s*:\s*"(resp_[A-Za-z0-9_-]{1,128})"')
# in the response.created event's data: {"type":"response.created",...,"response":{"id":"resp_..."
_CREATED_ID = re.compile(rb'"response"\s*:\s*\{\s*"id"\s*:\s*"(resp_[A-Za-z0-9_-]{1,128})"')


class _HasUrl(Protocol):
    @property
    def url(self) -> str: ...


E = TypeVar("E", bound=_HasUrl)


class StickyResponsesConfig(BaseModel):
    """How many response ids the router remembers, and for how long (``sticky_responses``)."""

    model_config = ConfigDict(extra="forbid")

    max_entries: int = Field(100_000, ge=0, description="response ids kept (0: follow-ups are not routed)")
    ttl_s: float = Field(3600.0, gt=0, description="seconds an id is kept after its response")


def id_from_body(body: bytes) -> str | None:
    """The response id at the top of a whole ``/v1/responses`` answer, if it starts with one."""
    found = _TOP_ID.match(body[:HEAD_BYTES])
    return found.group(1).decode() if found else None


def id_from_frames(frames: bytes) -> str | None:
    """The response id of a stream's ``response.created`` event, if ``frames`` hold it."""
    if b"response.created" not in frames:
        return None
    found = _CREATED_ID.search(frames)
    return found.group(1).decode() if found else None


def unknown_response(response_id: str) -> OpenAIError:
    """vLLM's answer for an id its store does not hold."""
    return OpenAIError(404, f"Response with id '{response_id}' not found.")


@dataclass(slots=True)
class _Entry:
    engine: str
    at: float


class ResponseOwners:
    """Response id -> the URL of the engine that stored it; LRU by count, with a TTL.

    No clock inside: callers pass ``now`` (the router's monotonic clock).
    """

    def __init__(self, config: StickyResponsesConfig) -> None:
        self.max_entries = config.max_entries
        self.ttl_s = config.ttl_s
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, response_id: str, engine: str, now: float) -> None:
        if self.max_entries == 0:
            return
        self._entries[response_id] = _Entry(engine, now)
        self._entries.move_to_end(response_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def owner(self, response_id: str, now: float) -> str | None:
        """The engine URL that holds ``response_id``; None when unknown or expired."""
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        if now - entry.at > self.ttl_s:
            del self._entries[response_id]
            return None
        self._entries.move_to_end(response_id)
        return entry.engine


def previous_owner(owners: ResponseOwners, body: dict[str, object], now: float) -> str | None:
    """The engine URL holding the request's ``previous_response_id``, when the router knows it."""
    previous = body.get("previous_response_id")
    return owners.owner(previous, now) if isinstance(previous, str) else None


def prefer_owner(owner: str | None, candidates: list[E]) -> list[E]:
    """Only the owner among ``candidates`` when it is one of them, else all (normal routing)."""
    if owner is None:
        return candidates
    return [e for e in candidates if e.url == owner] or candidates
