"""The async REST client: JSON objects in and out over one pooled ``httpx`` client.

Every request carries the token its :class:`TokenSource` gives now; a 401 invalidates it and the
request is sent once more with a fresh one (a rotated file, a re-run exec plugin). Errors are one
type, :class:`KubeError`, with the HTTP status and the API's ``Status`` reason and message.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Generator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from kvstack.common.kube.credentials import Credentials, TokenSource

Obj = dict[str, Any]


class KubeError(RuntimeError):
    """The API answered an error (``status`` 0: no answer at all)."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"HTTP {status}{f' {reason}' if reason else ''}: {message}")
        self.status = status
        self.reason = reason


def resource_path(
    api_version: str,
    plural: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """``/api/v1/namespaces/ns/pods/name`` and the like (``namespace=None``: cluster-wide)."""
    parts = ["/api/v1" if api_version == "v1" else f"/apis/{api_version}"]
    if namespace is not None:
        parts.append(f"namespaces/{quote(namespace, safe='')}")
    parts.append(plural)
    if name is not None:
        parts.append(quote(name, safe=""))
    if subresource is not None:
        parts.append(subresource)
    return "/".join(parts)


class _BearerAuth(httpx.Auth):
    def __init__(self, source: TokenSource) -> None:
        self.source = source

    async def async_auth_flow(self, request: httpx.Request) -> Any:  # an async generator, as httpx wants
        token = await self.source.token()
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401 and token:
            self.source.invalidate()
            fresh = await self.source.token()
            if fresh and fresh != token:
                request.headers["Authorization"] = f"Bearer {fresh}"
                yield request

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        raise RuntimeError("KubeClient is async only")


@dataclass(frozen=True, slots=True)
class ObjectList:
    items: list[Obj]
    resource_version: str


class KubeClient:
    """Reads and writes of any resource, by path (see :func:`resource_path`)."""

    def __init__(self, credentials: Credentials, *, timeout: float = 30.0, read_timeout: float | None = None):
        self.credentials = credentials
        basic = None
        if credentials.username and credentials.password:
            basic = httpx.BasicAuth(credentials.username, credentials.password)
        self._http = httpx.AsyncClient(
            base_url=credentials.server,
            verify=credentials.ssl_context(),
            auth=basic or _BearerAuth(credentials.token),
            timeout=httpx.Timeout(timeout, read=read_timeout or timeout),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        body: Obj | None = None,
        content_type: str = "application/json",
        missing_ok: bool = False,
    ) -> Obj | None:
        """One request; the answer's JSON. ``missing_ok``: a 404 returns None instead of raising."""
        content = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if content is not None else {}
        for attempt in (1, 2):
            try:
                resp = await self._http.request(method, path, params=params, content=content, headers=headers)
                break
            except httpx.TransportError as err:
                # A pooled keep-alive connection the server already closed fails on reuse: one retry.
                # Callers send idempotent requests (GET, apply, merge patch, delete), or accept a
                # duplicate (an Event).
                if attempt == 2:
                    raise KubeError(0, f"{method} {path}: {err!r}") from err
        if resp.status_code == 404 and missing_ok:
            return None
        if resp.status_code >= 400:
            raise _error(resp, f"{method} {path}")
        result: Obj = resp.json()
        return result

    async def get(self, path: str) -> Obj | None:
        """The object at ``path``, or None if there is none."""
        return await self.request("GET", path, missing_ok=True)

    async def create(self, path: str, body: Obj) -> Obj:
        return _present(await self.request("POST", path, body=body))

    async def delete(self, path: str, *, propagation: str = "Background") -> None:
        """Delete, if there (a 404 is not an error)."""
        await self.request("DELETE", path, body={"propagationPolicy": propagation}, missing_ok=True)

    async def apply(self, path: str, obj: Obj, *, manager: str, force: bool = True) -> Obj:
        """Server-side apply of ``obj`` at ``path`` as field manager ``manager``."""
        params = {"fieldManager": manager, "force": str(force).lower()}
        return _present(
            await self.request(
                "PATCH", path, params=params, body=obj, content_type="application/apply-patch+yaml"
            )
        )

    async def merge_patch(self, path: str, patch: Obj, *, manager: str | None = None) -> Obj:
        """A JSON merge patch (for a subresource too: ``.../scale``, ``.../status``)."""
        params = {"fieldManager": manager} if manager else None
        return _present(
            await self.request(
                "PATCH", path, params=params, body=patch, content_type="application/merge-patch+json"
            )
        )

    async def scale(self, path: str, replicas: int, *, manager: str | None = None) -> Obj:
        """Set ``spec.replicas`` through the ``/scale`` subresource of the object at ``path``."""
        return await self.merge_patch(f"{path}/scale", {"spec": {"replicas": replicas}}, manager=manager)

    async def list(self, path: str, *, label_selector: str = "", page_size: int = 500) -> ObjectList:
        """Every matching object, pages joined, with the list's resourceVersion (to watch from)."""
        items: list[Obj] = []
        params: dict[str, str | int] = {"limit": page_size}
        if label_selector:
            params["labelSelector"] = label_selector
        while True:
            body = _present(await self.request("GET", path, params=params))
            items.extend(body.get("items") or [])
            meta = body.get("metadata") or {}
            if not meta.get("continue"):
                return ObjectList(items, str(meta.get("resourceVersion") or ""))
            params["continue"] = meta["continue"]

    @asynccontextmanager
    async def stream(self, path: str, params: Mapping[str, str | int]) -> AsyncIterator[AsyncIterator[str]]:
        """The lines of a streamed GET (a watch); an error status raises :class:`KubeError`."""
        async with self._http.stream("GET", path, params=params) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                raise _error(resp, f"GET {path}")
            yield resp.aiter_lines()


def _present(result: Obj | None) -> Obj:
    if result is None:
        raise KubeError(404, "no body")
    return result


def _error(resp: httpx.Response, what: str) -> KubeError:
    try:
        status = resp.json()
        message, reason = str(status.get("message", resp.text)), str(status.get("reason", ""))
    except ValueError:
        message, reason = resp.text, ""
    return KubeError(resp.status_code, f"{what}: {message}", reason)
