"""The generated rules pass promtool's checks and unit tests, and every alert is tested both ways."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kvstack.dashboards.rules import ALERTS, RECORDS, rule_groups

from .conftest import run_promtool


def test_promtool_check_rules(promtool: str, repo_root: Path) -> None:
    result = run_promtool(promtool, "check", "rules", str(repo_root / "dashboards/rules/kvstack.rules.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RECORDS) + len(ALERTS)} rules found" in result.stdout


def test_promtool_unit_tests_pass(promtool: str, repo_root: Path) -> None:
    files = sorted(str(p) for p in (repo_root / "dashboards/rules/tests").glob("*.yaml"))
    assert files
    result = run_promtool(promtool, "test", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def _cases(repo_root: Path) -> dict[str, tuple[int, int]]:
    """Alert name -> (firing cases, silent cases) over every promtool test file."""
    out: dict[str, tuple[int, int]] = {}
    for path in (repo_root / "dashboards/rules/tests").glob("*.yaml"):
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                firing, silent = out.get(case["alertname"], (0, 0))
                if case.get("exp_alerts"):
                    firing += 1
                else:
                    silent += 1
                out[case["alertname"]] = (firing, silent)
    return out


@pytest.mark.parametrize("alert", [a.alert for a in ALERTS])
def test_every_alert_has_a_firing_and_a_silent_case(alert: str, repo_root: Path) -> None:
    firing, silent = _cases(repo_root).get(alert, (0, 0))
    assert firing >= 1, f"{alert}: no promtool case where it fires"
    assert silent >= 1, f"{alert}: no promtool case where it stays silent"


def test_no_test_names_an_unknown_alert(repo_root: Path) -> None:
    assert set(_cases(repo_root)) <= {a.alert for a in ALERTS}


def test_a_broken_rule_is_caught(promtool: str, tmp_path: Path) -> None:
    # The check above can fail: promtool rejects a rule file with a PromQL syntax error.
    path = tmp_path / "broken.yaml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "sum(rate(x[5m])"}]}]})
    )
    assert run_promtool(promtool, "check", "rules", str(path)).returncode != 0


@pytest.mark.parametrize("alert", ALERTS, ids=[a.alert for a in ALERTS])
def test_alert_shape(alert: object) -> None:
    from kvstack.dashboards.rules import Alert

    assert isinstance(alert, Alert)
    assert alert.severity in {"critical", "warning"}
    assert alert.inputs, "an alert needs inputs the live test can check"
    assert alert.summary and alert.description


def test_rule_names_are_unique_and_recordings_follow_the_naming_convention() -> None:
    groups = rule_groups()
    names = [r.get("record") or r["alert"] for g in groups for r in g["rules"]]
    assert len(names) == len(set(names))
    # level:metric:operations (Prometheus' recording-rule naming convention)
    assert all(r.record.startswith("kvstack:") and r.record.count(":") == 2 for r in RECORDS)
