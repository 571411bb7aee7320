"""``kvstack engine sim``."""

from __future__ import annotations


def sim() -> None:
    """Run the CPU simulator of one vLLM 0.24 pod (being built)."""
    raise SystemExit("kvstack engine sim: being built")
