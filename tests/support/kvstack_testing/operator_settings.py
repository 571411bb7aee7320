"""Operator settings for a test or benchmark run against the harness cluster, and the operator run
in the test's own process."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvstack.operator.settings import OperatorSettings
from kvstack_testing.cluster import Cluster

if TYPE_CHECKING:
    from kopf.testing import KopfRunner

    from kvstack.operator.runtime import Runtime


def operator_settings(cluster: Cluster, namespace: str, **overrides: Any) -> OperatorSettings:
    """Settings for an in-process operator watching ``namespace`` of ``cluster``.

    No metrics or liveness server (ports 0) and a fast tick, unless ``overrides`` say otherwise.
    """
    values: dict[str, Any] = {
        "namespace": namespace,
        "kubeconfig": cluster.kubeconfig,
        "context": cluster.context,
        "metrics_port": 0,
        "liveness_port": 0,
        "tick_seconds": 0.5,
    }
    return OperatorSettings(**{**values, **overrides})


def operator_runner(runtime: Runtime, namespace: str) -> KopfRunner:
    """The operator's handlers bound to ``runtime``, under kopf's test runner (a context manager):
    standalone (no peering with another operator), watching ``namespace``."""
    # imported here: every test session loads this package, few of them run the operator
    from kopf.testing import KopfRunner

    from kvstack.operator.handlers import build_registry

    args = ["run", "--standalone", "--namespace", namespace]
    return KopfRunner(args, registry=build_registry(runtime), timeout=30)
