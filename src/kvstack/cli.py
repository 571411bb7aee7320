"""The ``kvstack`` command line: one entry point, one sub-command per component.

Each component owns its sub-command in its own ``cli`` module and imports its heavy
dependencies inside the command body, so ``kvstack --help`` stays fast.

Help is click's plain layout (``rich_markup_mode=None``), for every sub-command: typer's rich
panels squeeze long option names (``--no-enable-prefix-caching``) into "…" at 80 columns and
label every flag ``<bool>`` though it takes no value; click's layout puts a long name on its
own line and shows a flag bare. Options keep their ``rich_help_panel`` groups as sections.
"""

from __future__ import annotations

import contextlib
import importlib
import textwrap
from typing import Any

import typer
from typer.core import TyperCommand

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


def _options_in_sections(command: Any, ctx: Any, formatter: Any) -> None:
    """Options under their ``rich_help_panel`` as section titles (the rest under "Options"), in
    the order declared; the plain layout would list them all as one."""
    sections: dict[str, list[tuple[str, str]]] = {}
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        if param.param_type_name == "argument":
            title = "Arguments"
        else:
            title = getattr(param, "rich_help_panel", None) or "Options"
        sections.setdefault(title, []).append(record)
    for title, rows in sections.items():
        with formatter.section(title):
            formatter.write_dl(rows)


_wrap_help_at_spaces_only()
setattr(TyperCommand, "format_options", _options_in_sections)  # noqa: B010 (mypy forbids assigning a method)

app = typer.Typer(
    name="kvstack",
    help="kvstack: serve LLMs on Kubernetes with vLLM, LMCache and a cache-aware router.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},  # click's default caps help at 80 on any terminal
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
