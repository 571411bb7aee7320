"""A benchmark option that cannot run, as typer's own usage error.

The benchmarks' plans (:mod:`kvstack.bench.routing_plan`, :mod:`kvstack.bench.tokenizer_choice`)
decide from their options without I/O and raise this naming the option, as the command line spells
it; the commands let it through, and typer prints it as a usage error on that option (exit 2), so
no command translates it again.
"""

from __future__ import annotations

import typer


class OptionError(typer.BadParameter):
    """``option`` (e.g. ``--tokenizer``) cannot be used as given: ``message`` says why."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message, param_hint=option)
        self.option = option
