#!/usr/bin/env python3
"""Generate kubeconform's standalone, strict JSON schemas from Kubernetes' own OpenAPI spec.

kubeconform downloads its schemas from GitHub by default; without network access we build them
from ``api/openapi-spec/swagger.json`` inside the Go module ``k8s.io/kubernetes@vX.Y.Z`` (fetched
through the Go module proxy). Output layout: ``{kind}-{group}-{version}.json`` (``{kind}-{version}``
for the core group), which is what kubeconform's ``{{ .ResourceKind }}{{ .KindSuffix }}`` expects.

Each file is standalone: the root kind plus every definition it reaches, kept under
``definitions`` (not inlined, so recursive types such as JSONSchemaProps stay finite). Strict:
every object that lists its properties rejects unknown ones.

Usage: scripts/k8s-schemas.py --kubernetes-version 1.34.4 --out ~/.cache/kvstack/schemas/v1.34.4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REF_PREFIX = "#/definitions/"
# Types the swagger spec declares as strings but whose JSON/YAML form may also be a number.
_QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
_INT_OR_STRING = "io.k8s.apimachinery.pkg.util.intstr.IntOrString"
_SPECIAL: dict[str, dict[str, Any]] = {
    _QUANTITY: {"anyOf": [{"type": "string"}, {"type": "number"}]},
    _INT_OR_STRING: {"anyOf": [{"type": "string"}, {"type": "integer"}]},
}


def schema_file_name(group: str, version: str, kind: str) -> str:
    """kubeconform's file name for a kind: only the group's first DNS label is kept."""
    prefix = group.split(".")[0].lower()
    suffix = f"-{prefix}-{version}" if prefix else f"-{version}"
    return f"{kind.lower()}{suffix}.json"


def strictify(node: Any) -> Any:
    """A copy of ``node`` where objects with ``properties`` forbid other keys; formats dropped.

    Formats are dropped because swagger's ("int32", "int-or-string", ...) are not JSON Schema
    formats, and ``x-kubernetes-*`` extensions mean nothing to a validator.
    """
    if isinstance(node, list):
        return [strictify(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "format" or key.startswith("x-kubernetes-"):
            continue
        # "properties" maps names to schemas: recurse into each schema, never treat names as keys.
        if key == "properties" and isinstance(value, dict):
            out[key] = {name: strictify(sub) for name, sub in value.items()}
        else:
            out[key] = strictify(value)
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def refs_in(node: Any) -> Iterable[str]:
    """Definition names referenced anywhere under ``node``."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(REF_PREFIX):
            yield ref[len(REF_PREFIX) :]
        for value in node.values():
            yield from refs_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs_in(item)


def reachable(definitions: Mapping[str, Any], root: str) -> list[str]:
    """``root`` and every definition it reaches, in discovery order."""
    seen: dict[str, None] = {}
    stack = [root]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        if name not in definitions:
            raise KeyError(f"definition {name!r} is referenced but not in the spec")
        seen[name] = None
        stack.extend(refs_in(definitions[name]))
    return list(seen)


def definition_schema(definitions: Mapping[str, Any], name: str) -> dict[str, Any]:
    """One definition, made strict, or the special form of Quantity / IntOrString."""
    if name in _SPECIAL:
        return dict(_SPECIAL[name])
    return dict(strictify(definitions[name]))


def standalone_schema(definitions: Mapping[str, Any], root: str) -> dict[str, Any]:
    """The strict schema of ``root``, carrying every definition it reaches."""
    names = reachable(definitions, root)
    schema = definition_schema(definitions, root)
    schema["$schema"] = "http://json-schema.org/draft-04/schema#"
    others = {name: definition_schema(definitions, name) for name in names if name != root}
    if others:
        schema["definitions"] = others
    return schema


def kinds(definitions: Mapping[str, Any]) -> Iterable[tuple[str, str, str, str]]:
    """``(definition, group, version, kind)`` for every top-level kind in the spec."""
    for name, definition in definitions.items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            # List kinds and the shared meta types (DeleteOptions, WatchEvent) are not manifests.
            if gvk["kind"].endswith("List") or "apimachinery.pkg.apis.meta" in name:
                continue
            yield name, gvk["group"], gvk["version"], gvk["kind"]


def write_schemas(swagger: Mapping[str, Any], out: Path) -> int:
    """Write one file per kind under ``out``; returns how many."""
    definitions = swagger["definitions"]
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for name, group, version, kind in kinds(definitions):
        path = out / schema_file_name(group, version, kind)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(standalone_schema(definitions, name), separators=(",", ":")))
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file
        count += 1
    return count


def download_swagger(kubernetes_version: str) -> Path:
    """``swagger.json`` of ``k8s.io/kubernetes@v<version>`` through ``go mod download``."""
    env = {**os.environ, "GOFLAGS": "-mod=mod"}
    proc = subprocess.run(
        ["go", "mod", "download", "-json", f"k8s.io/kubernetes@v{kubernetes_version}"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"go mod download k8s.io/kubernetes@v{kubernetes_version} failed:\n{proc.stderr}")
    return Path(json.loads(proc.stdout)["Dir"]) / "api" / "openapi-spec" / "swagger.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", default="1.34.4", help="e.g. 1.34.4")
    parser.add_argument("--swagger", type=Path, help="a swagger.json to read instead of downloading")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the schemas into")
    args = parser.parse_args(argv)
    swagger_path = args.swagger or download_swagger(args.kubernetes_version)
    count = write_schemas(json.loads(swagger_path.read_text()), args.out)
    print(f"wrote {count} schemas to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
