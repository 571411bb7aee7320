"""Who owns an operator-made object, and how it is labelled, named and found again for pruning.

Every object carries the ``app.kubernetes.io/*`` labels the Helm chart uses and an ownerReference
to its stack, so deleting the stack deletes them (the garbage collector follows owners).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvstack.operator.crd import GROUP, KIND, VERSION
from kvstack.operator.spec import Model

MANAGER = "kvstack-operator"
MODEL_LABEL = "kvstack.dev/model"
Obj = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Owner:
    """The stack that owns the objects."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> Obj:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def selector_labels(owner: Owner, component: str, model: str | None = None) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "kvstack",
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/component": component,
    }
    if model is not None:
        labels[MODEL_LABEL] = model
    return labels


def labels(owner: Owner, component: str, model: str | None = None) -> dict[str, str]:
    return {
        **selector_labels(owner, component, model),
        "app.kubernetes.io/part-of": "kvstack",
        "app.kubernetes.io/managed-by": MANAGER,
    }


def managed_selector(owner: Owner) -> str:
    """Label selector of everything the operator made for ``owner`` (used to prune)."""
    return f"app.kubernetes.io/instance={owner.name},app.kubernetes.io/managed-by={MANAGER}"


def object_meta(owner: Owner, name: str, component: str, model: str | None = None) -> Obj:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, component, model),
        "ownerReferences": [owner.reference()],
    }


def engine_name(owner: Owner, model: Model) -> str:
    return f"{owner.name}-{model.name}"


def router_name(owner: Owner) -> str:
    return f"{owner.name}-router"


def cache_name(owner: Owner) -> str:
    return f"{owner.name}-redis"


def key(obj: Obj) -> tuple[str, str, str]:
    """(apiVersion, kind, name): what identifies an object within the stack's namespace."""
    return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]


def to_prune(existing: list[tuple[str, str, str]], desired: list[Obj]) -> list[tuple[str, str, str]]:
    """Objects the operator made earlier that the spec no longer asks for (a removed model)."""
    wanted = {key(o) for o in desired}
    return sorted(k for k in existing if k not in wanted)
