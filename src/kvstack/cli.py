"""The ``kvstack`` command line: one entry point, one sub-command per component.

Each component owns its sub-command in its own ``cli`` module and imports its heavy
dependencies inside the command body, so ``kvstack --help`` stays fast.
"""

from __future__ import annotations

import typer

from kvstack import __version__
from kvstack.bench.cli import app as bench_app
from kvstack.dashboards.cli import app as dashboards_app
from kvstack.engine.cli import app as engine_app
from kvstack.operator.cli import run_operator
from kvstack.router.cli import run_router
from kvstack.stack.cli import up

app = typer.Typer(
    name="kvstack",
    help="kvstack: serve LLMs on Kubernetes with vLLM, LMCache and a cache-aware router.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(engine_app, name="engine")
app.add_typer(bench_app, name="bench")
app.add_typer(dashboards_app, name="dashboards")
app.command("router")(run_router)
app.command("operator")(run_operator)
app.command("up")(up)


@app.command("version")
def version() -> None:
    """Print kvstack's version."""
    typer.echo(__version__)


def main() -> None:
    app()
