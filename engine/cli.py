"""``kvstack engine serve`` (the engine pod's program) and ``kvstack engine sim`` (the CPU simulator)."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Run an engine: real vLLM + LMCache (serve) or the CPU simulator (sim).", no_args_is_help=True
)
