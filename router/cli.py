"""``kvstack router``: the OpenAI-compatible cache-aware gateway."""

from __future__ import annotations


def run_router() -> None:
    """Run the router (not built yet)."""
    raise SystemExit("kvstack router: not built yet")
