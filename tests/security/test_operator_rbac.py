"""The operator's RBAC in the chart (operator.enabled=true) against what the operator really does.

tests/helm/test_policy.py holds every Role to the general policy (namespaced, no secrets, no
escalate/bind/impersonate, the router read-only). This adds: the operator may write exactly the
kinds it reconciles (plus its own resource, events and the scale subresource), and the Role it
creates for the router grants nothing the operator lacks, or the API server refuses to create it
(RBAC escalation prevention).
"""

from __future__ import annotations

from typing import Any

import pytest
from tests.helm.conftest import VALUES_DIR, HelmChart, chart, helm_bin

from kvstack.operator.kube import OWNED_KINDS
from kvstack.operator.ownership import Owner
from kvstack.operator.resources import desired_objects
from kvstack.operator.spec import parse_spec

__all__ = ["chart", "helm_bin"]

APPLY = {"get", "create", "patch"}  # server-side apply: read, then create or patch
WRITE = {"create", "update", "patch", "delete", "deletecollection"}
# writes that are not owned objects: its resource and status, events, the engines' scale
EXTRA_WRITES = {("kvstack.dev", "kvstacks"), ("kvstack.dev", "kvstacks/status"), ("", "events")}
EXTRA_WRITES |= {("apps", "deployments/scale")}
# blockOwnerDeletion on owned objects needs update on the owner's finalizers (admission plugin)
EXTRA_WRITES |= {("kvstack.dev", "kvstacks/finalizers")}
FULL_SPEC = {
    "models": [
        {"name": "llama", "model": "sim-llama", "gpus": 1},
        {"name": "qwen", "model": "sim-qwen", "gpus": 2},
    ],
    "router": {"enabled": True},
    "cache": {"mode": "internal"},
}


def _resource(api_version: str, kind: str) -> tuple[str, str]:
    group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
    return group, kind.lower() + "s"


def _grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


@pytest.fixture(scope="module")
def operator_role(chart: HelmChart) -> dict[tuple[str, str], set[str]]:
    rendered = chart.template([VALUES_DIR / "autoscaling.yaml"])
    (role,) = [
        o
        for o in rendered.of_kind("Role")
        if o["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"
    ]
    return _grants(role["rules"])


def test_the_operator_may_apply_list_and_prune_every_kind_it_owns(
    operator_role: dict[tuple[str, str], set[str]],
) -> None:
    """Without one of these verbs a reconcile fails in the cluster with a 403."""
    desired = desired_objects(Owner("demo", "serving", "uid-1"), parse_spec(FULL_SPEC))
    kinds = {_resource(o["apiVersion"], o["kind"]) for o in desired}
    owned = {_resource(v, k) for v, k in OWNED_KINDS}
    assert kinds <= owned, "an applied kind is never listed for pruning"
    missing = {r: sorted({*APPLY, "list", "delete"} - operator_role.get(r, set())) for r in owned}
    assert not {r: v for r, v in missing.items() if v}


def test_the_operator_writes_nothing_else(operator_role: dict[tuple[str, str], set[str]]) -> None:
    """Least privilege: write verbs only on owned kinds and the few extras it needs."""
    owned = {_resource(v, k) for v, k in OWNED_KINDS}
    extra = {r for r, verbs in operator_role.items() if verbs & WRITE and r not in owned | EXTRA_WRITES}
    assert not extra


def test_the_role_it_creates_for_the_router_is_within_its_own(
    operator_role: dict[tuple[str, str], set[str]],
) -> None:
    """Otherwise the API server refuses the router's Role (escalation prevention) and the stack
    never gets a router."""
    desired = desired_objects(Owner("demo", "serving", "uid-1"), parse_spec(FULL_SPEC))
    (role,) = [o for o in desired if o["kind"] == "Role"]
    router_grants = _grants(role["rules"])
    assert router_grants, "the router's Role grants nothing: the test would prove nothing"
    beyond = {r: sorted(v - operator_role.get(r, set())) for r, v in router_grants.items()}
    assert not {r: v for r, v in beyond.items() if v}
