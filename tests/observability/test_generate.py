"""``kvstack dashboards generate``: deterministic output, ``--check`` catches every kind of drift."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvstack.dashboards import generate as gen
from kvstack.dashboards.cli import app


def test_committed_files_match_the_code(repo_root: Path) -> None:
    assert gen.check(repo_root) == []


def test_output_is_deterministic() -> None:
    assert gen.dashboard_files() == gen.dashboard_files()
    assert gen.rules_text() == gen.rules_text()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty checkout with generated files written into it."""
    gen.write(tmp_path)
    return tmp_path


def test_write_creates_dashboards_and_rules(root: Path) -> None:
    assert sorted(p.name for p in (root / "dashboards/json").iterdir()) == [
        "autoscaler.json",
        "engines.json",
        "overview.json",
        "router.json",
    ]
    data = json.loads((root / "dashboards/json/overview.json").read_text())
    assert data["uid"] == "kvstack-overview"
    assert (root / "dashboards/rules/kvstack.rules.yaml").read_text().startswith("# Generated")
    # No chart folders in this checkout: nothing written there, and none created.
    assert not (root / "helm").exists()
    assert gen.check(root) == []


def test_chart_copies_only_when_the_chart_folders_exist(root: Path) -> None:
    (root / gen.CHART_RULES).mkdir(parents=True)
    assert [d.path for d in gen.check(root)] == [gen.CHART_RULES / gen.RULES_FILE]
    (root / gen.CHART_DASHBOARDS).mkdir(parents=True)
    gen.write(root)
    assert gen.check(root) == []
    assert len(list((root / gen.CHART_DASHBOARDS).glob("*.json"))) == 4


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda r: (r / "dashboards/json/router.json").write_text("{}"), "differs"),
        (lambda r: (r / "dashboards/json/router.json").unlink(), "missing"),
        (lambda r: (r / "dashboards/json/old.json").write_text("{}"), "stale"),
        (lambda r: (r / "dashboards/rules/kvstack.rules.yaml").write_text("groups: []\n"), "differs"),
    ],
)
def test_check_reports_drift_and_write_repairs_it(root: Path, damage: object, reason: str) -> None:
    damage(root)  # type: ignore[operator]
    drift = gen.check(root)
    assert [d.reason for d in drift] == [reason]
    assert gen.write(root) == [drift[0].path]
    assert gen.check(root) == []


def test_cli_check_exit_codes(root: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["generate", "--check", "--root", str(root)])
    assert ok.exit_code == 0, ok.output
    (root / "dashboards/json/engines.json").write_text("{}")
    bad = runner.invoke(app, ["generate", "--check", "--root", str(root)])
    assert bad.exit_code == 1
    assert "dashboards/json/engines.json: differs" in bad.output
    fixed = runner.invoke(app, ["generate", "--root", str(root)])
    assert fixed.exit_code == 0 and "wrote dashboards/json/engines.json" in fixed.output
    assert runner.invoke(app, ["generate", "--check", "--root", str(root)]).exit_code == 0


def test_cli_default_root_is_this_checkout(repo_root: Path) -> None:
    from kvstack.dashboards.cli import _default_root

    assert _default_root() == repo_root
