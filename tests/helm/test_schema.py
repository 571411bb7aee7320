"""values.schema.json rejects bad values before anything renders, with a message naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.helm.conftest import CHART, HelmChart

MODEL = {"name": "m", "model": "org/model"}


def model(**overrides: Any) -> dict[str, Any]:
    return {"engines": {"models": [{**MODEL, **overrides}]}}


# (case, values, fragments the error must contain)
CASES: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("wrong type", {"router": {"replicas": "two"}}, ("/router/replicas", "got string, want integer")),
    ("unknown key", {"router": {"replica": 2}}, ("/router", "additional properties 'replica' not allowed")),
    ("unknown top-level key", {"engine": {}}, ("additional properties 'engine' not allowed",)),
    ("unknown model key", model(gpu=1), ("/engines/models/0", "additional properties 'gpu' not allowed")),
    ("negative replicas", model(replicas=-1), ("/engines/models/0/replicas", "minimum: got -1, want 0")),
    ("negative router replicas", {"router": {"replicas": -2}}, ("/router/replicas", "minimum")),
    (
        "bad eviction enum",
        {"redis": {"maxmemoryPolicy": "lru"}},
        ("/redis/maxmemoryPolicy", "value must be one of"),
    ),
    ("bad remote mode", {"lmcache": {"remote": {"mode": "memcached"}}}, ("/lmcache/remote/mode", "one of")),
    ("bad pull policy", {"router": {"image": {"pullPolicy": "Sometimes"}}}, ("/router/image/pullPolicy",)),
    (
        "model name not a DNS label",
        model(name="Llama_8B"),
        ("/engines/models/0/name", "does not match pattern"),
    ),
    ("model without model id", {"engines": {"models": [{"name": "m"}]}}, ("missing property 'model'",)),
    ("block size", model(blockSize=17), ("/engines/models/0/blockSize",)),
    (
        "pin timeout",
        model(lmcache={"pinTimeoutSec": 0}),
        ("/engines/models/0/lmcache/pinTimeoutSec", "minimum"),
    ),
    (
        "gpu memory fraction",
        model(gpuMemoryUtilization=1.5),
        ("/engines/models/0/gpuMemoryUtilization", "maximum"),
    ),
    ("random hash seed", {"engines": {"pythonHashSeed": "random"}}, ("/engines/pythonHashSeed",)),
    (
        "privilege escalation",
        {
            "router": {
                "securityContext": {"allowPrivilegeEscalation": True, "capabilities": {"drop": ["ALL"]}}
            }
        },
        ("/router/securityContext/allowPrivilegeEscalation", "value must be false"),
    ),
    (
        "root pods",
        {
            "redis": {
                "podSecurityContext": {"runAsNonRoot": False, "seccompProfile": {"type": "RuntimeDefault"}}
            }
        },
        ("/redis/podSecurityContext/runAsNonRoot", "value must be true"),
    ),
    (
        "capabilities kept",
        model(securityContext={"allowPrivilegeEscalation": False, "capabilities": {"drop": ["NET_RAW"]}}),
        ("/engines/models/0/securityContext/capabilities/drop", "contains"),
    ),
    (
        "no memory limit",
        # null is how a user deletes a default key in Helm
        {"router": {"resources": {"limits": {"memory": None}}}},
        ("/router/resources/limits", "missing property 'memory'"),
    ),
    (
        "bad quantity",
        {"redis": {"resources": {"requests": {"cpu": "lots", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}}},
        ("/redis/resources/requests/cpu",),
    ),
    (
        "password in a plain URL",
        {"lmcache": {"remote": {"mode": "external", "externalUrl": "redis://:hunter2@redis:6379"}}},
        ("/lmcache/remote/externalUrl", "does not match pattern"),
    ),
    (
        "pdb of zero",
        {"router": {"podDisruptionBudget": {"maxUnavailable": 0}}},
        ("/router/podDisruptionBudget/maxUnavailable",),
    ),
    (
        "scrape interval",
        {"monitoring": {"podMonitor": {"interval": "often"}}},
        ("/monitoring/podMonitor/interval",),
    ),
]


@pytest.mark.parametrize(("values", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_values_are_rejected_by_name(
    values: dict[str, Any], fragments: tuple[str, ...], chart: HelmChart, tmp_path: Path
) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    error = chart.template_error([path])
    assert "values don't meet the specifications of the schema" in error
    for fragment in fragments:
        assert fragment in error, error


def test_autoscaling_bounds_must_be_ordered(chart: HelmChart, tmp_path: Path) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(model(autoscaling={"minReplicas": 5, "maxReplicas": 2})))
    assert "engines.models[m].autoscaling: minReplicas (5) is above maxReplicas (2)" in chart.template_error(
        [path]
    )


def test_external_mode_needs_a_url(chart: HelmChart, tmp_path: Path) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({"lmcache": {"remote": {"mode": "external"}}}))
    assert (
        "lmcache.remote.externalUrl (or lmcache.remote.existingSecret) is required"
        in chart.template_error([path])
    )


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def test_every_value_in_values_yaml_is_documented() -> None:
    # A leaf key is documented when a comment sits right above it or above one of its ancestors
    # (e.g. the keys inside a documented `resources:` block).
    lines = (CHART / "values.yaml").read_text().splitlines()
    keys = [
        i
        for i, line in enumerate(lines)
        if ":" in line and not line.lstrip().startswith(("#", "-")) and line.strip()
    ]

    def commented(i: int) -> bool:
        above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        return above.lstrip().startswith("#")

    def is_leaf(i: int) -> bool:
        if lines[i].split(":", 1)[1].strip():
            return True
        nxt = next(
            (
                lines[j]
                for j in range(i + 1, len(lines))
                if lines[j].strip() and not lines[j].lstrip().startswith("#")
            ),
            "",
        )
        return _indent(nxt) <= _indent(lines[i])

    undocumented = []
    for i in keys:
        if not is_leaf(i):
            continue
        chain, indent = [i], _indent(lines[i])
        for j in reversed([k for k in keys if k < i]):
            if _indent(lines[j]) < indent:
                chain.append(j)
                indent = _indent(lines[j])
        if not any(commented(k) for k in chain):
            undocumented.append(f"{i + 1}: {lines[i].strip()}")
    assert not undocumented, "values without a comment:\n" + "\n".join(undocumented)


def test_schema_is_strict_at_every_level() -> None:
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    loose = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and node.get("additionalProperties") is not False
            ):
                loose.append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(schema, "#")
    # `global` is Helm's parent-chart channel; it has no properties of ours.
    assert not loose, loose
