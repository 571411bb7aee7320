"""Security and bad-input harness: the router test harness's simulators and routers, shared."""

from __future__ import annotations

from tests.router.conftest import router, sims

__all__ = ["router", "sims"]
