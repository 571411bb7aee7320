"""The operator stopped in the middle of a reconcile and started again: no duplicate objects.

Uses the operator suite's harness (KopfRunner against the real API server, kwok pods). Prometheus
down (the operator holds replicas) is covered by tests/operator/test_autoscale_cluster.py::
test_load_scales_engines_up_then_down_and_a_blind_operator_holds.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from tests.operator.conftest import Api, api, crd_installed, kubeconfig_env
from tests.operator.test_reconcile_cluster import SPEC

from kvstack.common.kube import resource_path
from kvstack.common.waits import wait_until
from kvstack.operator.runtime import Runtime
from kvstack_testing import Cluster, operator_runner, operator_settings

__all__ = ["api", "crd_installed", "kubeconfig_env"]

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

KINDS = ("Deployment", "Service", "ConfigMap")


@contextlib.contextmanager
def operator(cluster: Cluster, namespace: str) -> Iterator[None]:
    """The operator under KopfRunner, as in tests/operator; tracebacks count until it is told to stop.

    (At a stop, the cleanup closes the shared API client under a running timer, which once logged a
    ReadError traceback there: tests/reliability/README.md, "An operator stop under a request".)
    """
    settings = operator_settings(cluster, namespace, resync_seconds=2.0)
    with operator_runner(Runtime(settings), namespace) as runner:
        yield
    assert runner.exception is None, runner.output
    running = runner.output.split("Operator is stopping")[0]
    assert "Traceback" not in running, runner.output


def _owned(api_: Api, stack_uid: str) -> Counter[tuple[str, str]]:
    """(kind, name) of every object in the namespace owned by the stack, counted."""
    found: Counter[tuple[str, str]] = Counter()
    listings = {
        kind: api_.kube.list(resource_path(api_version, plural, api_.namespace)).items
        for kind, api_version, plural in (
            ("Deployment", "apps/v1", "deployments"),
            ("Service", "v1", "services"),
            ("ConfigMap", "v1", "configmaps"),
        )
    }
    for kind, items in listings.items():
        for item in items:
            name = item["metadata"]["name"]
            refs = item["metadata"].get("ownerReferences") or []
            if any(ref["uid"] == stack_uid for ref in refs):
                found[(kind, name)] += 1
                assert len(refs) == 1, f"{kind}/{name} has owners {refs}"
    return found


@pytest.mark.usefixtures("kubeconfig_env")
def test_an_operator_restarted_mid_reconcile_finishes_without_duplicates(
    cluster: Cluster, namespace: str, api: Api
) -> None:
    """The stack's objects exist once each after the restart, and the stack reports Reconciled."""
    spec = {**SPEC, "models": [*SPEC["models"], {"name": "qwen", "model": "sim-qwen", "gpus": 1}]}
    with operator(cluster, namespace):
        stack = api.create("demo", spec)
        # stop as soon as the first owned object exists: the reconcile is (most likely) half done
        with contextlib.suppress(AssertionError):  # judged just below, once the operator is stopped
            wait_until(lambda: api.names("Deployment"), "the first Deployment", 60, 0.02)
    partial = set(api.names("Deployment"))
    assert partial, "the operator created nothing before it was stopped"
    with operator(cluster, namespace):
        want = {"demo-llama", "demo-qwen", "demo-router", "demo-redis"}
        wait_until(lambda: api.names("Deployment") >= want, "the stack's Deployments after the restart")
        wait_until(lambda: (api.condition("demo", "Reconciled") or {}).get("status") == "True", "Reconciled")
        time.sleep(3.0)  # a resync or two: nothing new may appear
        owned = _owned(api, stack["metadata"]["uid"])
    assert {name for kind, name in owned if kind == "Deployment"} == want
    assert all(count == 1 for count in owned.values()), owned
    assert {k for k, _ in owned} == set(KINDS)
