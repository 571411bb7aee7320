"""List, then watch, resuming as client-go's reflector does.

:func:`watch` is one watch request: JSON-lines events from a resourceVersion, with bookmarks, until
the server ends it (``timeoutSeconds``). A 410 Gone, up front or as an ``ERROR`` event in the
stream, raises :class:`WatchExpired`; any other ``ERROR`` event raises :class:`KubeError`.

:func:`reflect` chains them: a paginated list (yielded as :class:`Listed`), then watches, each
resumed from the last resourceVersion seen (an event's or a bookmark's); :class:`WatchExpired`
re-lists (a new :class:`Listed`). Any other failure propagates: the caller backs off and calls
again, which re-lists.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kvstack.common.kube.client import KubeClient, KubeError, Obj

EVENT_TYPES = ("ADDED", "MODIFIED", "DELETED", "BOOKMARK")


class WatchExpired(KubeError):
    """The API server no longer has the requested resourceVersion (410 Gone): re-list."""

    def __init__(self, message: str) -> None:
        super().__init__(410, message, "Expired")


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED or BOOKMARK
    object: Obj

    @property
    def resource_version(self) -> str | None:
        rv = (self.object.get("metadata") or {}).get("resourceVersion")
        return rv if isinstance(rv, str) and rv else None


@dataclass(frozen=True, slots=True)
class Listed:
    """A (re-)list: every object now, and the resourceVersion the watch goes on from."""

    items: list[Obj]
    resource_version: str


def parse_event(line: str) -> WatchEvent:
    """One watch line; raises WatchExpired / KubeError for ``ERROR`` events, ValueError if malformed."""
    event: Any = json.loads(line)
    if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
        raise ValueError(f"watch line is not an event: {line[:80]!r}")
    kind, obj = event.get("type"), event["object"]
    if kind == "ERROR":
        code = obj.get("code")
        message = f"watch error {code} {obj.get('reason', '')}: {obj.get('message', '')}"
        if code == 410:
            raise WatchExpired(message)
        raise KubeError(int(code) if isinstance(code, int) else 0, message, str(obj.get("reason", "")))
    if kind not in EVENT_TYPES:
        raise ValueError(f"unknown watch event type {kind!r}")
    return WatchEvent(str(kind), obj)


async def watch(
    kube: KubeClient,
    path: str,
    resource_version: str,
    *,
    label_selector: str = "",
    timeout_s: int = 300,
) -> AsyncIterator[WatchEvent]:
    """Events from ``resource_version`` until the server ends the watch (see the module docstring)."""
    params: dict[str, str | int] = {
        "watch": 1,
        "resourceVersion": resource_version,
        "allowWatchBookmarks": "true",
        "timeoutSeconds": timeout_s,
    }
    if label_selector:
        params["labelSelector"] = label_selector
    try:
        async with kube.stream(path, params) as lines:
            async for line in lines:
                if line.strip():
                    yield parse_event(line)
    except KubeError as err:
        if err.status == 410 and not isinstance(err, WatchExpired):
            raise WatchExpired(f"resourceVersion {resource_version} is gone: {err}") from err
        raise


async def reflect(
    kube: KubeClient, path: str, *, label_selector: str = "", timeout_s: int = 300
) -> AsyncIterator[Listed | WatchEvent]:
    """List, then watch for ever (see the module docstring); bookmarks are yielded too."""
    while True:
        listed = await kube.list(path, label_selector=label_selector)
        yield Listed(listed.items, listed.resource_version)
        rv = listed.resource_version
        while True:
            began, events = asyncio.get_running_loop().time(), 0
            try:
                async for event in watch(kube, path, rv, label_selector=label_selector, timeout_s=timeout_s):
                    events += 1
                    rv = event.resource_version or rv
                    yield event
            except WatchExpired:
                break  # re-list
            if not events and asyncio.get_running_loop().time() - began < 1.0:
                # a watch the server ends at once, empty, would otherwise spin: let the caller back off
                raise KubeError(0, f"the watch of {path} ended as soon as it began")
