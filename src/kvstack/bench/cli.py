"""``kvstack bench``: benchmarks."""

from __future__ import annotations

import typer

app = typer.Typer(help="Benchmarks: write JSON results and PNG plots.", no_args_is_help=True)
