"""Turn configuration errors into one clear line and exit status 2, the way CLI users expect."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import typer

from kvstack.common.config import ConfigError

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def config_errors_exit() -> Iterator[None]:
    """Print a ConfigError as ``error: ...`` on stderr and exit with status 2."""
    try:
        yield
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err


def exits_on_config_error(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator form of :func:`config_errors_exit` for command functions."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with config_errors_exit():
            return fn(*args, **kwargs)

    return wrapper
