"""``kvstack engine serve``: build the engine config, then print or exec the vLLM command."""

from __future__ import annotations

import enum
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from kvstack.common.cli_errors import config_errors_exit
from kvstack.engine.serve.config import load_config
from kvstack.engine.serve.display import to_json, to_shell
from kvstack.engine.serve.render import LaunchSpec, child_env, needs_metrics_dir, overridden_env, render
from kvstack.engine.serve.versions import LMCACHE_VERSION, VLLM_VERSION

# Shell conventions: 127 = command not found, 126 = found but cannot be executed.
EXIT_NOT_FOUND = 127
EXIT_CANNOT_EXEC = 126


class OutputFormat(enum.StrEnum):
    shell = "shell"
    json = "json"


def serve(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="YAML file of engine settings; KVSTACK_ENGINE_* env vars override it."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the environment and command (secrets masked) and exit.")
    ] = False,
    output: Annotated[OutputFormat, typer.Option("--format", help="--dry-run output.")] = OutputFormat.shell,
) -> None:
    """Run vLLM 0.24 with the LMCache connector, configured from a file and KVSTACK_ENGINE_* env vars."""
    with config_errors_exit():
        cfg = load_config(config)
    spec = render(cfg)
    if dry_run:
        typer.echo(to_json(spec) if output is OutputFormat.json else to_shell(spec))
        return
    exec_engine(spec)


def exec_engine(spec: LaunchSpec) -> NoReturn:
    """Replace this process with vLLM, so it receives the pod's signals directly as PID 1."""
    env = child_env(os.environ, spec)
    if needs_metrics_dir(os.environ, spec):
        env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="vllm-metrics-")
    for name in overridden_env(os.environ, spec):
        typer.echo(
            # names only: VLLM_API_KEY is one of them
            f"warning: the pod's {name} is replaced by the value rendered from the engine config; "
            "set it there (engine/README.md names the field)",
            err=True,
        )
    program = spec.argv[0]
    path = shutil.which(program, path=env.get("PATH", os.defpath))
    if path is None:
        typer.echo(
            f"error: cannot run {program!r}: not found on PATH. Install vllm=={VLLM_VERSION} with "
            f"lmcache=={LMCACHE_VERSION}, use the kvstack engine image, or set KVSTACK_ENGINE_VLLM_BIN.",
            err=True,
        )
        raise typer.Exit(EXIT_NOT_FOUND)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(path, spec.argv, env)
    except OSError as err:
        typer.echo(f"error: cannot run {path}: {err.strerror}", err=True)
        raise typer.Exit(EXIT_CANNOT_EXEC) from err
