"""``kvstack up``: the local stack."""

from __future__ import annotations


def up() -> None:
    """Start simulated engines and the router on localhost (not built yet)."""
    raise SystemExit("kvstack up: not built yet")
