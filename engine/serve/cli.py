"""``kvstack engine serve``."""

from __future__ import annotations


def serve() -> None:
    """Render the vLLM + LMCache command line from config and exec it (being built)."""
    raise SystemExit("kvstack engine serve: being built")
