"""A small async client of the Prometheus HTTP API (``/api/v1/query``): one evaluation's queries.

Any failure (unreachable, timeout, HTTP error, an error status, a malformed body) raises
:class:`PrometheusError`; the autoscaler then holds replicas and reports it.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import httpx

from kvstack.operator.signals import PodKey, Queries, Results


class PrometheusError(RuntimeError):
    """Prometheus could not answer a query."""


class Prometheus:
    """Instant queries against one Prometheus base URL."""

    def __init__(self, base_url: str, timeout: float = 5.0, client: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = client or httpx.AsyncClient(timeout=timeout)
        self._owns_client = client is None

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """Series of an instant vector (a scalar comes back as one series without labels)."""
        try:
            resp = await self._client.get(f"{self.base_url}/api/v1/query", params={"query": expr})
            body: Any = resp.json()
        except (httpx.HTTPError, ValueError) as err:
            raise PrometheusError(f"cannot query Prometheus at {self.base_url}: {err!r}") from err
        if not isinstance(body, dict) or body.get("status") != "success":
            detail = body.get("error") if isinstance(body, dict) else None
            raise PrometheusError(f"Prometheus refused {expr!r}: HTTP {resp.status_code} {detail or ''}")
        data = body.get("data") or {}
        try:
            if data.get("resultType") == "scalar":
                return [({}, float(data["result"][1]))]
            return [(dict(s.get("metric", {})), float(s["value"][1])) for s in data.get("result", [])]
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise PrometheusError(f"malformed answer to {expr!r}: {err!r}") from err

    async def _one(self, expr: str | None) -> float | None:
        if expr is None:
            return None
        series = await self.query(expr)
        return series[0][1] if series else None

    async def results(self, q: Queries) -> Results:
        """Run one evaluation's queries concurrently."""
        (values, stamps, rate, pending, activity, running), capacity = await asyncio.gather(
            asyncio.gather(
                self.query(q.value),
                self.query(q.stamps),
                self._one(q.rate),
                self._one(q.pending),
                self._one(q.activity),
                self.query(q.running) if q.running else _nothing(),
            ),
            self._one(q.capacity),
        )
        return Results(
            values=_by_pod(values),
            stamps=_by_pod(stamps),
            rate=None if rate is None or math.isnan(rate) else rate,
            pending=pending,
            activity=activity,
            running=_by_pod(running) if q.running else None,
            capacity=None if capacity is None or math.isnan(capacity) else capacity,
        )


async def _nothing() -> list[tuple[dict[str, str], float]]:
    return []


def _by_pod(series: list[tuple[dict[str, str], float]]) -> dict[PodKey, float]:
    return {(labels.get("pod", ""), labels.get("instance", "")): value for labels, value in series}
