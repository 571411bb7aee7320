"""The ``kvstack`` command line: one entry point, one sub-command per component.

Each component owns its sub-command in its own ``cli`` module and imports its heavy
dependencies inside the command body, so ``kvstack --help`` stays fast.

Help is click's plain layout (``rich_markup_mode=None``), for every sub-command: typer's rich
panels squeeze long option names (``--no-enable-prefix-caching``) into "…" at 80 columns and
label every flag ``<bool>`` though it takes no value; click's layout puts a long name on its
own line and shows a flag bare.
"""

from __future__ import annotations

import contextlib
import importlib
import textwrap

import typer

from kvstack import __version__
from kvstack.bench.cli import app as bench_app
from kvstack.common.cli_errors import expected_errors_exit
from kvstack.dashboards.cli import app as dashboards_app
from kvstack.engine.cli import app as engine_app
from kvstack.operator.cli import run_operator
from kvstack.router.cli import run_router
from kvstack.stack.cli import up


def _wrap_help_at_spaces_only() -> None:
    """click wraps help at hyphens too ("redis-" / "server", "--kv-events-" / "endpoint"), but names
    of options and programs must stay whole. Typer renders help with its own copy of click."""
    for name in ("typer._click._textwrap", "click._textwrap"):
        with contextlib.suppress(ImportError):
            wrapper = importlib.import_module(name).TextWrapper
            wrapper.wordsep_re = textwrap.TextWrapper.wordsep_simple_re


_wrap_help_at_spaces_only()

app = typer.Typer(
    name="kvstack",
    help="kvstack: serve LLMs on Kubernetes with vLLM, LMCache and a cache-aware router.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
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
    with expected_errors_exit():
        app()
