"""helm/kvstack/VALUES.md is generated from values.yaml's comments and the schema's types, complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from tests.helm.conftest import CHART, ROOT

from kvstack import values_reference as ref

SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "router": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "replicas": {"type": "integer"},
                "level": {"enum": ["info", "debug"]},
                "resources": {"$ref": "#/$defs/resources"},
            },
        },
        "seed": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    },
    "$defs": {"resources": {"type": "object"}},
}
VALUES = """# A section comment, not a description.
router:
  # -- Router replicas; the description
  # goes on over lines.
  replicas: 2
  # -- Log level.
  level: info
  # -- Resources, shown whole.
  resources:
    requests: {cpu: 1}
# -- Hash seed.
seed: "0"
"""


def test_the_committed_reference_is_current() -> None:
    assert (CHART / ref.OUTPUT).read_text() == ref.generate(CHART)


def test_rows_take_descriptions_defaults_and_types() -> None:
    rows = {r.key: r for r in ref.rows(VALUES, SCHEMA)}
    assert list(rows) == ["router.replicas", "router.level", "router.resources", "seed"]
    assert rows["router.replicas"] == ref.Row(
        "router.replicas", "integer", 2, "Router replicas; the description goes on over lines."
    )
    assert rows["router.level"].type == 'one of "info", "debug"'
    assert rows["router.resources"].default == {"requests": {"cpu": 1}}  # $ref resolved, map whole
    assert rows["seed"].type == "string or integer"


def test_an_undocumented_value_is_an_error_naming_it() -> None:
    values = VALUES.replace("  # -- Log level.\n", "")
    with pytest.raises(ref.ReferenceError, match=r"router\.level: no `# --` comment"):
        ref.rows(values, SCHEMA)


def test_a_value_the_schema_does_not_type_is_an_error_naming_it() -> None:
    values = VALUES + "# -- Not in the schema.\nextra: 1\n"
    with pytest.raises(ref.ReferenceError, match=r"extra: not typed in values.schema.json"):
        ref.rows(values, SCHEMA)


def test_the_chart_reference_covers_every_knob() -> None:
    keys = {
        r.key
        for r in ref.rows(
            (CHART / "values.yaml").read_text(), json.loads((CHART / "values.schema.json").read_text())
        )
    }
    assert {
        "engines.defaults.env",
        "engines.defaults.envFrom",
        "engines.defaults.initContainers",
        "engines.defaults.extraVolumes",
        "engines.defaults.modelCache.accessModes",
        "monitoring.podMonitor.relabelings",
        "monitoring.serviceMonitor.metricRelabelings",
        "operator.affinity",
        "redis.auth.existingSecret",
    } <= keys


def test_check_write_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chart = tmp_path / "kvstack"
    shutil.copytree(CHART, chart, ignore=shutil.ignore_patterns("files", "templates"))
    assert ref.main(["--chart", str(chart), "--check"]) == 0
    (chart / ref.OUTPUT).write_text("stale\n")
    assert ref.main(["--chart", str(chart), "--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert ref.main(["--chart", str(chart)]) == 0
    assert ref.main(["--chart", str(chart), "--check"]) == 0
    values = chart / "values.yaml"
    values.write_text(values.read_text() + "undocumented: 1\n")
    assert ref.main(["--chart", str(chart), "--check"]) == 2
    assert "undocumented: no `# --` comment" in capsys.readouterr().err


def test_lint_checks_it_and_the_readme_links_it() -> None:
    assert "$(BIN)/python -m kvstack.values_reference --check" in (ROOT / "Makefile").read_text()
    assert "(kvstack/VALUES.md)" in (ROOT / "helm" / "README.md").read_text()
