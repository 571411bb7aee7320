"""The pure parts of the shared layer: resource paths and watch-line parsing."""

from __future__ import annotations

import json

import pytest

from kvstack.common.kube import KubeError, WatchExpired, resource_path
from kvstack.common.kube.watch import parse_event


@pytest.mark.parametrize(
    ("args", "path"),
    [
        (("v1", "pods", "llm"), "/api/v1/namespaces/llm/pods"),
        (("v1", "pods", "llm", "e-0", "status"), "/api/v1/namespaces/llm/pods/e-0/status"),
        (("apps/v1", "deployments", "llm", "d", "scale"), "/apis/apps/v1/namespaces/llm/deployments/d/scale"),
        (("v1", "nodes", None, "gpu-node-0"), "/api/v1/nodes/gpu-node-0"),
        (("v1", "pods"), "/api/v1/pods"),  # every namespace
        (("v1", "pods", "a/b", "x y"), "/api/v1/namespaces/a%2Fb/pods/x%20y"),  # never a path injection
    ],
)
def test_resource_path(args: tuple[str, ...], path: str) -> None:
    assert resource_path(*args) == path


def line(kind: str, obj: object) -> str:
    return json.dumps({"type": kind, "object": obj})


@pytest.mark.parametrize("kind", ["ADDED", "MODIFIED", "DELETED", "BOOKMARK"])
def test_events_carry_their_object_and_version(kind: str) -> None:
    event = parse_event(line(kind, {"metadata": {"name": "p", "resourceVersion": "42"}}))
    assert (event.type, event.object["metadata"]["name"], event.resource_version) == (kind, "p", "42")


@pytest.mark.parametrize(
    ("text", "error", "status"),
    [
        (line("ERROR", {"kind": "Status", "code": 410, "reason": "Expired"}), WatchExpired, 410),
        (line("ERROR", {"kind": "Status", "code": 500, "reason": "InternalError"}), KubeError, 500),
        (line("ERROR", {"kind": "Status"}), KubeError, 0),
    ],
)
def test_error_events_raise(text: str, error: type[KubeError], status: int) -> None:
    with pytest.raises(error) as err:
        parse_event(text)
    assert type(err.value) is error and err.value.status == status


@pytest.mark.parametrize("text", [line("SURPRISE", {}), json.dumps([1]), json.dumps({"type": "ADDED"}), "{"])
def test_malformed_lines_raise_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_event(text)
