"""``kvstack operator``: the kopf operator that reconciles ``KVStack`` resources and autoscales engines.

Flags override ``KVSTACK_OPERATOR_*`` variables. Without ``--namespace`` or ``--all-namespaces`` it
watches ``KVSTACK_OPERATOR_NAMESPACE`` (set by the Helm chart) or, failing that, every namespace.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kvstack.common.cli_errors import exits_on_config_error

if TYPE_CHECKING:
    import threading

    from kvstack.operator.runtime import Runtime


@exits_on_config_error
def run_operator(
    namespace: Annotated[
        list[str] | None, typer.Option("--namespace", "-n", help="Namespace to watch; repeat for several.")
    ] = None,
    all_namespaces: Annotated[
        bool, typer.Option("--all-namespaces", "-A", help="Watch every namespace.")
    ] = False,
    prometheus_url: Annotated[
        str | None, typer.Option(help="Prometheus for stacks that name none (default http://127.0.0.1:9090).")
    ] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Port of /metrics (default 9102; 0: off).")] = None,
    liveness_port: Annotated[
        int | None, typer.Option(help="Port of /healthz (default 8080; 0: off).")
    ] = None,
    kubeconfig: Annotated[
        Path | None, typer.Option(help="Kubeconfig (default: in-cluster, else $KUBECONFIG).")
    ] = None,
    context: Annotated[str | None, typer.Option(help="Kubeconfig context.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run the operator: reconcile KVStack resources and autoscale their engines from Prometheus."""
    from kvstack.operator.runtime import Runtime
    from kvstack.operator.settings import load_settings

    settings = load_settings(
        namespaces=namespace or None,
        all_namespaces=all_namespaces or None,
        prometheus_url=prometheus_url,
        metrics_port=metrics_port,
        liveness_port=liveness_port,
        kubeconfig=kubeconfig,
        context=context,
    )
    _check_cluster(settings.kubeconfig, settings.context)
    run(Runtime(settings), verbose=verbose)


def _check_cluster(kubeconfig: Path | None, context: str | None) -> None:
    """Fail in one line, before kopf starts, on credentials that do not load or an API server that
    does not answer: kopf itself would log a traceback and keep retrying the login."""
    from kvstack.common.config import ConfigError
    from kvstack.common.kube.blocking import BlockingKube
    from kvstack.common.kube.client import KubeError
    from kvstack.common.kube.credentials import KubeConfigError, load_credentials

    try:
        credentials = load_credentials(kubeconfig, context)
    except KubeConfigError as err:
        raise ConfigError(str(err)) from err
    with BlockingKube(credentials, timeout=10.0) as kube:
        try:
            kube.request("GET", "/version")
        except KubeError as err:
            api = f"the Kubernetes API at {credentials.server}"
            if credentials.source:
                api += f" ({credentials.source})"
            if err.status == 0:  # no answer at all
                raise ConfigError(f"cannot reach {api}: {err.__cause__ or err}") from err
            if err.status == 401:
                raise ConfigError(f"{api} refused the credentials") from err
            # any other answer means a live server: kopf reports what it cannot do there


def run(runtime: Runtime, *, verbose: bool = False, stop_flag: threading.Event | None = None) -> None:
    """Run kopf with the operator's handlers until SIGINT/SIGTERM (or ``stop_flag``)."""
    import asyncio
    import logging

    import kopf

    from kvstack.operator.handlers import build_registry

    s = runtime.settings
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    namespaces = s.watched_namespaces()
    liveness = f"http://{s.liveness_host}:{s.liveness_port}/healthz" if s.liveness_port else None
    asyncio.run(
        kopf.operator(
            registry=build_registry(runtime),
            standalone=True,  # one replica (Recreate); peering would only pause it
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=liveness,
            stop_flag=stop_flag,
        )
    )
