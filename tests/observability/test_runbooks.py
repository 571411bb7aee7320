"""Every alert links a runbook page in docs/runbooks/, and every page belongs to an alert."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstack.dashboards.rules import ALERTS, RUNBOOK_BASE, Alert, rule_groups

SECTIONS = ("## Meaning", "## How to check", "## What to do")


def _runbooks(repo_root: Path) -> Path:
    return repo_root / "docs" / "runbooks"


@pytest.mark.parametrize("alert", ALERTS, ids=[a.alert for a in ALERTS])
def test_every_alert_has_a_runbook_page(alert: Alert, repo_root: Path) -> None:
    assert alert.runbook_url == f"{RUNBOOK_BASE}{alert.alert}.md"
    assert RUNBOOK_BASE.endswith("/docs/runbooks/")
    page = _runbooks(repo_root) / f"{alert.alert}.md"
    assert page.is_file(), f"{alert.alert}: no {page.relative_to(repo_root)}"
    text = page.read_text()
    assert text.startswith(f"# {alert.alert}\n")
    assert f"Severity: **{alert.severity}**" in text
    for section in SECTIONS:
        assert section in text, f"{page.name}: missing {section!r}"


def test_the_rendered_rules_carry_the_runbook_url() -> None:
    (alerts,) = [g for g in rule_groups() if g["name"] == "kvstack.alerts"]
    urls = {r["alert"]: r["annotations"]["runbook_url"] for r in alerts["rules"]}
    assert urls == {a.alert: f"{RUNBOOK_BASE}{a.alert}.md" for a in ALERTS}


def test_no_page_without_an_alert_and_the_index_lists_them_all(repo_root: Path) -> None:
    names = {a.alert for a in ALERTS}
    pages = {p.stem for p in _runbooks(repo_root).glob("*.md")} - {"README"}
    assert pages == names
    index = (_runbooks(repo_root) / "README.md").read_text()
    assert all(f"]({n}.md)" in index for n in names)
