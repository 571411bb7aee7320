"""Operator settings for a test or benchmark run against the harness cluster."""

from __future__ import annotations

from typing import Any

from kvstack.operator.settings import OperatorSettings
from kvstack_testing.cluster import Cluster


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
