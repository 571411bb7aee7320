"""``kvstack dashboards``: generate the dashboards and rules, check them for drift, preview them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Grafana dashboards and Prometheus rules, generated from Python.", no_args_is_help=True
)

ROOT_OPTION = typer.Option(help="Repository root (default: the one this package lives in).")


def _default_root() -> Path:
    # dashboards/ is symlinked into src/kvstack; resolve() lands in the checkout's dashboards/.
    return Path(__file__).resolve().parents[1]


@app.command()
def generate(
    check: Annotated[
        bool, typer.Option("--check", help="Fail (exit 1) if a generated file drifted.")
    ] = False,
    root: Annotated[Path | None, ROOT_OPTION] = None,
) -> None:
    """Write dashboards/json/*.json and dashboards/rules/kvstack.rules.yaml (and the chart's copies)."""
    from kvstack.dashboards import generate as gen

    base = root or _default_root()
    if check:
        drift = gen.check(base)
        for d in drift:
            typer.echo(f"{d.path}: {d.reason}", err=True)
        if drift:
            typer.echo("generated files are out of date: run `kvstack dashboards generate`", err=True)
            raise typer.Exit(1)
        typer.echo("generated files are up to date")
        return
    for path in gen.write(base):
        typer.echo(f"wrote {path}")


@app.command()
def preview(
    prometheus: Annotated[str, typer.Option("--prometheus", help="Prometheus base URL.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for one PNG per dashboard.")],
    minutes: Annotated[float, typer.Option(help="How far back to plot.")] = 15.0,
    step: Annotated[float, typer.Option(help="Seconds between plotted points.")] = 5.0,
    rate_interval: Annotated[str, typer.Option(help="What $__rate_interval becomes.")] = "1m",
) -> None:
    """Render every dashboard's panels from a live Prometheus into a PNG grid (no Grafana needed)."""
    from kvstack.dashboards.catalog import dashboards
    from kvstack.dashboards.preview import render_dashboard
    from kvstack.observability.prometheus import PrometheusAPI, PrometheusError

    api = PrometheusAPI(prometheus)
    out.mkdir(parents=True, exist_ok=True)
    try:
        for stem, dash in dashboards().items():
            path = render_dashboard(api, dash, out / f"{stem}.png", minutes * 60, step, rate_interval)
            typer.echo(f"wrote {path}")
    except PrometheusError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
