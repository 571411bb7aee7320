"""Security policy over every object the chart renders, for every values file.

Pods run as non-root under RuntimeDefault (or a Localhost) seccomp profile, with no host
namespaces or host paths; every container drops all capabilities, cannot escalate, has a
read-only root filesystem and sets its resources; only pods that call the API get a token;
RBAC is namespaced and read-mostly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.helm.conftest import HelmChart, containers, pod_specs, values_files

VALUES = values_files()
# Components that talk to the Kubernetes API and so need a service-account token.
API_CLIENTS = {"router", "operator"}
FORBIDDEN_VERBS = {"*", "escalate", "bind", "impersonate"}


def violations(obj: dict[str, Any]) -> Iterator[str]:
    """Every policy breach in one rendered object."""
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    component = obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")
    for spec in pod_specs(obj):
        pod_sc = spec.get("securityContext", {})
        if pod_sc.get("runAsNonRoot") is not True:
            yield f"{where}: pod runAsNonRoot is not true"
        if pod_sc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            yield f"{where}: pod has no seccomp profile"
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(field):
                yield f"{where}: {field}"
        if any("hostPath" in v for v in spec.get("volumes", [])):
            yield f"{where}: hostPath volume"
        token = spec.get("automountServiceAccountToken")
        if component in API_CLIENTS and token is not True:
            yield f"{where}: an API client without its token"
        if component not in API_CLIENTS and token is not False:
            yield f"{where}: mounts a service-account token it never uses"
    for c in containers(obj):
        name = f"{where}/{c['name']}"
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            yield f"{name}: allowPrivilegeEscalation is not false"
        if sc.get("privileged"):
            yield f"{name}: privileged"
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            yield f"{name}: capabilities not dropped"
        if sc.get("capabilities", {}).get("add"):
            yield f"{name}: adds capabilities"
        if sc.get("readOnlyRootFilesystem") is not True:
            yield f"{name}: writable root filesystem"
        resources = c.get("resources", {})
        if not {"cpu", "memory"} <= set(resources.get("requests", {})):
            yield f"{name}: no cpu/memory requests"
        if "memory" not in resources.get("limits", {}):
            yield f"{name}: no memory limit"
        if c["image"].endswith(":latest") or ":" not in c["image"].rsplit("/", 1)[-1]:
            yield f"{name}: image without a pinned tag"
    if obj["kind"] in ("ClusterRole", "ClusterRoleBinding"):
        yield f"{where}: cluster-wide RBAC"
    if obj["kind"] == "Role":
        for rule in obj["rules"]:
            if FORBIDDEN_VERBS & set(rule["verbs"]):
                yield f"{where}: verbs {sorted(FORBIDDEN_VERBS & set(rule['verbs']))}"
            if "secrets" in rule["resources"]:
                yield f"{where}: reads secrets"
            # A wildcard only over our own API group (the operator's custom resources).
            if "*" in rule["resources"] and rule["apiGroups"] != ["kvstack.dev"]:
                yield f"{where}: wildcard resources in {rule['apiGroups']}"
            if component == "router" and set(rule["verbs"]) - {"get", "list", "watch"}:
                yield f"{where}: the router may write"


@pytest.mark.parametrize("values", VALUES, ids=[p.stem for p in VALUES])
def test_every_object_meets_the_policy(values: Path, chart: HelmChart) -> None:
    rendered = chart.template([values])
    assert rendered.objects
    breaches = [v for obj in rendered.objects for v in violations(obj)]
    assert not breaches, "\n".join(breaches)


def _deployment(**pod: Any) -> dict[str, Any]:
    base_container = {
        "name": "c",
        "image": "img:1",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "1Gi"}},
    }
    spec = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "automountServiceAccountToken": False,
        "containers": [{**base_container, **pod.pop("container", {})}],
        **pod,
    }
    return {
        "kind": "Deployment",
        "metadata": {"name": "d", "labels": {"app.kubernetes.io/component": "engine"}},
        "spec": {"template": {"spec": spec}},
    }


# The policy itself must catch what it claims to: one breach per case.
BREACHES = [
    ("compliant", _deployment(), None),
    ("root", _deployment(securityContext={"seccompProfile": {"type": "RuntimeDefault"}}), "runAsNonRoot"),
    ("host network", _deployment(hostNetwork=True), "hostNetwork"),
    ("token", _deployment(automountServiceAccountToken=True), "token it never uses"),
    (
        "escalation",
        _deployment(
            container={"securityContext": {"readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}}
        ),
        "allowPrivilegeEscalation",
    ),
    (
        "no limits",
        _deployment(container={"resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}),
        "no memory limit",
    ),
    ("latest", _deployment(container={"image": "img:latest"}), "pinned tag"),
    ("cluster role", {"kind": "ClusterRole", "metadata": {"name": "r"}, "rules": []}, "cluster-wide"),
    (
        "secrets",
        {
            "kind": "Role",
            "metadata": {"name": "r"},
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}],
        },
        "reads secrets",
    ),
]


@pytest.mark.parametrize(("obj", "expected"), [b[1:] for b in BREACHES], ids=[b[0] for b in BREACHES])
def test_the_policy_catches_each_breach(obj: dict[str, Any], expected: str | None) -> None:
    found = list(violations(obj))
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0], found
