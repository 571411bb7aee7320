"""``python -m kvstack_testing``: build the tools, run a cluster in the foreground, clean up."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer

from kvstack.common.cli_errors import exits_on_config_error
from kvstack.common.config import build

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


@app.command()
def tools() -> None:
    """Build (once) every binary into ~/.cache/kvstack/bin."""
    from kvstack_testing.tools import build_tools

    build_tools(("all",))


@app.command()
@exits_on_config_error
def cluster(
    sims: Annotated[
        str, typer.Option(help="Run simulators for pods matching this label selector ('' for none).")
    ] = "app.kubernetes.io/component=engine",
) -> None:
    """Start a cluster and keep it until Ctrl-C; KVSTACK_CLUSTER_* variables shape it."""
    from kvstack_testing.cluster import Cluster, ClusterConfig
    from kvstack_testing.pod_sims import PodSimulators
    from kvstack_testing.tools import build_tools, cache_root

    build_tools(("all",))
    config = build(ClusterConfig, "cluster config")
    if config.workdir is None:  # a stable kubeconfig path for the developer's shell
        config = config.model_copy(update={"workdir": cache_root() / "clusters" / config.name})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    typer.echo(f"starting cluster {config.name!r} ...", err=True)
    with Cluster(config) as running:
        pods = PodSimulators(running.credentials(), sims, log_dir=running.workdir) if sims else None
        try:
            if pods is not None:
                pods.start()
            typer.echo(f"cluster ready: {running.server} (Kubernetes {running.server_version()})")
            typer.echo(f"pod IPs in {running.pod_cidr} (loopback)")
            typer.echo(f"export KUBECONFIG={running.kubeconfig}")
            typer.echo(f"export PATH={running.tools.kube_bin_dir}:{running.tools.helm.parent}:$PATH")
            if pods is not None:
                typer.echo(f"simulators for pods matching {sims!r}; logs in {pods.log_dir}")
            typer.echo("Ctrl-C stops the cluster.")
            stop.wait()
        finally:
            if pods is not None:
                pods.stop()
    typer.echo("cluster stopped", err=True)


@app.command()
def clean() -> None:
    """Kill and remove clusters whose owner is gone (e.g. a killed test run)."""
    from kvstack_testing.cluster import reap_stale_clusters

    for path in reap_stale_clusters():
        typer.echo(f"removed {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
