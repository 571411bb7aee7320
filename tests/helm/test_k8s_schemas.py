"""scripts/k8s-schemas.py: kubeconform's file layout, strictness, and self-contained definitions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "k8s-schemas.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("k8s_schemas", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load()


@pytest.mark.parametrize(
    ("group", "version", "kind", "expected"),
    [
        ("", "v1", "Service", "service-v1.json"),
        ("apps", "v1", "Deployment", "deployment-apps-v1.json"),
        ("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebinding-rbac-v1.json"),
        ("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicy-networking-v1.json"),
        ("monitoring.coreos.com", "v1", "ServiceMonitor", "servicemonitor-monitoring-v1.json"),
        ("autoscaling", "v2", "HorizontalPodAutoscaler", "horizontalpodautoscaler-autoscaling-v2.json"),
    ],
)
def test_file_names_follow_kubeconform(group: str, version: str, kind: str, expected: str) -> None:
    assert gen.schema_file_name(group, version, kind) == expected


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        ({"type": "string", "format": "int32"}, {"type": "string"}),
        (
            {"type": "object", "properties": {"a": {"type": "integer", "format": "int64"}}},
            {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
        ),
        # Maps keep their value schema; only objects that list properties become closed.
        (
            {"type": "object", "additionalProperties": {"type": "string"}},
            {"type": "object", "additionalProperties": {"type": "string"}},
        ),
        # A property literally named "format" is a property, not a keyword.
        (
            {"properties": {"format": {"type": "string"}}},
            {"properties": {"format": {"type": "string"}}, "additionalProperties": False},
        ),
        ({"x-kubernetes-preserve-unknown-fields": True, "type": "object"}, {"type": "object"}),
        (
            {"type": "array", "items": {"properties": {"b": {}}}},
            {"type": "array", "items": {"properties": {"b": {}}, "additionalProperties": False}},
        ),
    ],
)
def test_strictify(node: dict[str, Any], expected: dict[str, Any]) -> None:
    assert gen.strictify(node) == expected


DEFS: dict[str, Any] = {
    "A": {
        "type": "object",
        "properties": {"b": {"$ref": "#/definitions/B"}, "q": {"$ref": "#/definitions/" + gen._QUANTITY}},
    },
    "B": {
        "type": "object",
        "properties": {
            "self": {"$ref": "#/definitions/B"},
            "c": {"type": "array", "items": {"$ref": "#/definitions/C"}},
        },
    },
    "C": {"type": "string"},
    "Unused": {"type": "string"},
    gen._QUANTITY: {"type": "string", "format": "quantity"},
}


def test_reachable_follows_refs_and_stops_at_cycles() -> None:
    assert set(gen.reachable(DEFS, "A")) == {"A", "B", "C", gen._QUANTITY}


def test_reachable_names_a_dangling_ref() -> None:
    with pytest.raises(KeyError, match="Missing"):
        gen.reachable({"A": {"$ref": "#/definitions/Missing"}}, "A")


def test_standalone_schema_carries_its_definitions() -> None:
    schema = gen.standalone_schema(DEFS, "A")
    assert set(schema["definitions"]) == {"B", "C", gen._QUANTITY}
    assert schema["additionalProperties"] is False
    # Quantities are strings or numbers in YAML (`cpu: 1`).
    assert schema["definitions"][gen._QUANTITY] == {"anyOf": [{"type": "string"}, {"type": "number"}]}
    refs = set(gen.refs_in(schema))
    assert refs <= set(schema["definitions"])


def test_write_schemas_skips_lists_and_meta_kinds(tmp_path: Path) -> None:
    swagger = {
        "definitions": {
            "io.k8s.api.apps.v1.Deployment": {
                "type": "object",
                "properties": {"spec": {"$ref": "#/definitions/io.k8s.api.apps.v1.DeploymentSpec"}},
                "x-kubernetes-group-version-kind": [{"group": "apps", "version": "v1", "kind": "Deployment"}],
            },
            "io.k8s.api.apps.v1.DeploymentSpec": {
                "type": "object",
                "properties": {"replicas": {"type": "integer"}},
            },
            "io.k8s.api.apps.v1.DeploymentList": {
                "type": "object",
                "x-kubernetes-group-version-kind": [
                    {"group": "apps", "version": "v1", "kind": "DeploymentList"}
                ],
            },
            "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions": {
                "type": "object",
                "x-kubernetes-group-version-kind": [{"group": "", "version": "v1", "kind": "DeleteOptions"}],
            },
        }
    }
    assert gen.write_schemas(swagger, tmp_path) == 1
    written = json.loads((tmp_path / "deployment-apps-v1.json").read_text())
    assert written["definitions"]["io.k8s.api.apps.v1.DeploymentSpec"]["additionalProperties"] is False
    assert [p.name for p in tmp_path.iterdir()] == ["deployment-apps-v1.json"]
