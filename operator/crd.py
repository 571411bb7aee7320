"""The ``KVStack`` CustomResourceDefinition, generated from :mod:`kvstack.operator.spec`.

``python -m kvstack.operator.crd`` rewrites ``operator/crds/kvstack.dev_kvstacks.yaml`` and, in a source
checkout, the chart's copy ``helm/kvstack/files/crds/kvstack.dev_kvstacks.yaml`` (a file, not a link:
Helm warns on links and some checkouts have none); ``--check`` exits 1 when either differs from what
the models say (``make lint`` and a test run the same comparison).

Why the scale subresource scales the router: a resource has one scale subresource and a stack has
many models. Engine replicas belong to the autoscaler (or to ``models[].replicas`` when it is off),
so ``kubectl scale kvstack/x --replicas 3`` (and an HPA on CPU, if one wants it) sizes the router.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from kvstack.operator.spec import KVStackSpec

GROUP = "kvstack.dev"
VERSION = "v1alpha1"
KIND = "KVStack"
PLURAL = "kvstacks"
SINGULAR = "kvstack"
CRD_FILE = Path(__file__).resolve().parent / "crds" / f"{GROUP}_{PLURAL}.yaml"
# Only a source checkout has the chart beside the operator; an installed package writes its own copy.
CHART_CRD_FILE = Path(__file__).resolve().parents[1] / "helm" / "kvstack" / "files" / "crds" / CRD_FILE.name

_DROP = {"title", "$defs"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """Pydantic's JSON schema -> a Kubernetes structural schema (refs inlined, no nulls)."""
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        return _structural({**target, **{k: v for k, v in node.items() if k != "$ref"}}, defs)
    if "anyOf" in node:
        # Optional[X]: the field is simply optional in the resource.
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {node}")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        return _structural({**options[0], **rest}, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or (key == "default" and value is None):
            continue
        if key == "additionalProperties":
            if value is True:  # dict[str, Any]: keep whatever the user wrote
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict):
                out[key] = _structural(value, defs)
            continue  # False: properties already say it; structural schemas forbid both
        if key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
            continue
        if key == "properties":
            out[key] = {name: _structural(prop, defs) for name, prop in value.items()}
            for name, prop in value.items():
                # A nested object with defaults needs a default itself, or the API server never
                # creates it and its fields' defaults never apply.
                if "$ref" in prop and "default" not in prop:
                    out[key][name]["default"] = _default_of(prop["$ref"].rsplit("/", 1)[-1])
            continue
        out[key] = _structural(value, defs)
    if out.get("x-kubernetes-preserve-unknown-fields") and "type" not in out:
        out["type"] = "object"
    return out


def _default_of(model_name: str) -> dict[str, Any]:
    """A section's full default (the API server checks defaults against CEL rules as they are)."""
    from pydantic import BaseModel, ValidationError

    from kvstack.operator import spec

    cls = getattr(spec, model_name, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
        return {}
    try:
        return cls().model_dump(mode="json", by_alias=True, exclude_none=True)
    except ValidationError:
        return {}


def spec_schema() -> dict[str, Any]:
    raw = KVStackSpec.model_json_schema(by_alias=True)
    schema: dict[str, Any] = _structural(raw, raw.get("$defs", {}))
    return schema


def _condition() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string"},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "observedGeneration": {"type": "integer"},
        },
    }


def status_schema() -> dict[str, Any]:
    decision = {
        "type": "object",
        "properties": {
            "time": {"type": "string", "format": "date-time"},
            "direction": {"type": "string"},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "fromReplicas": {"type": "integer"},
            "toReplicas": {"type": "integer"},
        },
    }
    model = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "deployment": {"type": "string"},
            "desiredReplicas": {"type": "integer"},
            "currentReplicas": {"type": "integer"},
            "readyReplicas": {"type": "integer"},
            "lastScaleTime": {"type": "string", "format": "date-time"},
            "lastDecision": {**decision, "description": "the last evaluation"},
            "lastScale": {**decision, "description": "the last decision that changed replicas"},
        },
    }
    return {
        "type": "object",
        "properties": {
            "observedGeneration": {"type": "integer"},
            "engines": {"type": "string", "description": "ready/desired engine pods over all models"},
            "conditions": {
                "type": "array",
                "items": _condition(),
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "models": {
                "type": "array",
                "items": model,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
            },
            "router": {
                "type": "object",
                "properties": {
                    "replicas": {"type": "integer"},
                    "readyReplicas": {"type": "integer"},
                    "selector": {"type": "string"},
                },
            },
            "adapters": _adapters_status(),
        },
    }


def _adapters_status() -> dict[str, Any]:
    """``status.adapters``: each declared LoRA adapter's placement, written by the operator."""
    adapter = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "model": {"type": "string", "description": "the models[].name it belongs to"},
            "desired": {"type": "integer", "description": "engines it should be loaded on"},
            "loaded": {"type": "integer", "description": "engines that list it as loaded"},
            "engines": {"type": "integer", "description": "ready engines of its model"},
            "reason": {"type": "string", "description": "why it is placed so (lora_placement.Reason)"},
            "lastError": {"type": "string", "description": "the last failed load or unload"},
        },
    }
    return {
        "type": "array",
        "items": adapter,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
    }


def crd() -> dict[str, Any]:
    """The CRD object."""
    columns = [
        ("Ready", "string", '.status.conditions[?(@.type=="Ready")].status', 0),
        ("Engines", "string", ".status.engines", 0),
        ("Router", "integer", ".status.router.readyReplicas", 0),
        ("Scaling", "string", '.status.conditions[?(@.type=="ScalingActive")].reason', 1),
        ("Age", "date", ".metadata.creationTimestamp", 0),
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": ["kvs"],
                "categories": ["kvstack"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.router.replicas",
                            "statusReplicasPath": ".status.router.replicas",
                            "labelSelectorPath": ".status.router.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": n, "type": t, "jsonPath": p, **({"priority": pr} if pr else {})}
                        for n, t, p, pr in columns
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A vLLM + LMCache serving stack: engines per model, a "
                            "cache-aware router, a shared KV cache, and autoscaling.",
                            "required": ["spec"],
                            # Owned objects are named <stack>-<model> (a model name takes up to 40)
                            # and Service names are DNS labels of at most 63 characters.
                            "x-kubernetes-validations": [
                                {
                                    "rule": "self.metadata.name.size() <= 22",
                                    "message": "metadata.name must be at most 22 characters",
                                }
                            ],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated by `python -m kvstack.operator.crd` from operator/spec.py; do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=110)


def targets() -> list[Path]:
    """The files that hold the CRD: the operator's, and the chart's when the chart is there."""
    return [CRD_FILE, *([CHART_CRD_FILE] if CHART_CRD_FILE.parent.is_dir() else [])]


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        stale = [path for path in targets() if not path.exists() or path.read_text() != text]
        for path in stale:
            print(f"{path} is out of date: run python -m kvstack.operator.crd", file=sys.stderr)
        return 1 if stale else 0
    for path in targets():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
