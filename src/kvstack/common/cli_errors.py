"""Expected failures end a command with one clear line on stderr and a non-zero status, never a
Python traceback: bad configuration (status 2, the way CLI users expect) and a child process that
failed to start (status 1, its own last log lines after the message)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import typer

from kvstack.common.config import ConfigError
from kvstack.common.procs import ProcessError

P = ParamSpec("P")
R = TypeVar("R")

CONFIG_ERROR = 2
PROCESS_ERROR = 1


@contextmanager
def config_errors_exit() -> Iterator[None]:
    """Print a ConfigError as ``error: ...`` on stderr and exit with status 2."""
    try:
        yield
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=CONFIG_ERROR) from err


def exits_on_config_error(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator form of :func:`config_errors_exit` for command functions."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with config_errors_exit():
            return fn(*args, **kwargs)

    return wrapper


@contextmanager
def expected_errors_exit() -> Iterator[None]:
    """Around the whole CLI (outside click, hence SystemExit): what any command may meet."""
    try:
        yield
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(CONFIG_ERROR) from err
    except ProcessError as err:
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(PROCESS_ERROR) from err
