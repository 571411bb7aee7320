"""``kvstack operator``: the kopf operator."""

from __future__ import annotations


def run_operator() -> None:
    """Run the operator (not built yet)."""
    raise SystemExit("kvstack operator: not built yet")
