"""``kvstack engine serve`` (the engine pod's program) and ``kvstack engine sim`` (the CPU simulator)."""

from __future__ import annotations

import typer

from kvstack.engine.serve.cli import serve
from kvstack.engine.sim.cli import sim

app = typer.Typer(
    help="Run an engine: real vLLM + LMCache (serve) or the CPU simulator (sim).", no_args_is_help=True
)
app.command("serve")(serve)
app.command("sim")(sim)
