"""Every dashboard follows the conventions: units, descriptions, templated datasource and filters,
rated counters, quantiles over ``sum by (le, ...)``, and only metric names that really exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kvstack.dashboards.adapters import NO_MODEL_LABEL
from kvstack.dashboards.autoscaler import CONTRACT
from kvstack.dashboards.catalog import dashboards
from kvstack.dashboards.panels import Dashboard, Panel
from kvstack.dashboards.promql import expand, metric_names
from kvstack.dashboards.rules import ALERTS, RECORDS

from .conftest import router_model_series, run_promtool

DASHBOARDS = dashboards()
PANELS = [(stem, p) for stem, d in DASHBOARDS.items() for p in d.panels()]
QUERIES = [(stem, p.title, q.expr) for stem, p in PANELS for q in p.queries]
RULE_EXPRS = [r.expr for r in RECORDS] + [a.expr for a in ALERTS] + [i for a in ALERTS for i in a.inputs]
MODEL_SERIES = router_model_series() | {n for n, (_, labels) in CONTRACT.items() if "model_name" in labels}
COUNTER = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*(?:_total|_bucket|_sum|_count))\b")


def ids(items: list[tuple[str, str, str]]) -> list[str]:
    return [f"{stem}:{title}" for stem, title, _ in items]


@pytest.mark.parametrize(("stem", "panel"), PANELS, ids=[f"{s}:{p.title}" for s, p in PANELS])
def test_every_panel_has_a_unit_a_description_and_queries(stem: str, panel: Panel) -> None:
    assert panel.unit, "panel without a unit"
    assert len(panel.description) > 20, "panel without a useful description"
    assert panel.queries, "panel without queries"


@pytest.mark.parametrize(("stem", "dash"), DASHBOARDS.items())
def test_dashboard_json_is_templated(stem: str, dash: Dashboard) -> None:
    data = dash.to_json()
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert {"namespace", "model"} <= set(variables)
    titles = [p["title"] for p in data["panels"] if p["type"] != "row"]
    assert len(titles) == len(set(titles)), "duplicate panel titles"
    for p in data["panels"]:
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
        assert p["fieldConfig"]["defaults"]["unit"]


def test_dashboard_uids_are_unique() -> None:
    uids = [d.uid for d in DASHBOARDS.values()]
    assert len(uids) == len(set(uids))


@pytest.mark.parametrize(("stem", "title", "expr"), QUERIES, ids=ids(QUERIES))
def test_query_conventions(stem: str, title: str, expr: str) -> None:
    # Counters and histogram series only ever appear inside rate() over $__rate_interval.
    for m in COUNTER.finditer(expr):
        assert expr[: m.start()].endswith("rate("), f"{m.group(1)} is not rate()-d"
    assert "[$__rate_interval]" in expr or not COUNTER.search(expr)
    assert not re.search(r"\[\d+[smhd]\]", expr), "fixed window: use $__rate_interval"
    # Quantiles aggregate buckets by le first, never per series.
    for m in re.finditer(r"histogram_quantile\([\d.]+, ", expr):
        assert expr[m.end() :].startswith("sum by (le"), "quantile without sum by (le, ...)"
    # Every selector filters on the namespace variable; per-model series on the model variable too.
    for sel in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr):
        name, matchers = sel
        assert 'namespace=~"$namespace"' in matchers, f"{name} ignores $namespace"
        if (name.startswith("vllm:") and name not in NO_MODEL_LABEL) or name in MODEL_SERIES:
            assert 'model_name=~"$model"' in matchers, f"{name} ignores $model"


def test_router_model_series_are_known() -> None:
    assert "kvstack_router_requests_total" in MODEL_SERIES
    assert "kvstack_router_engine_in_flight_requests" not in MODEL_SERIES


@pytest.mark.parametrize(("stem", "title", "expr"), QUERIES, ids=ids(QUERIES))
def test_query_names_exist(stem: str, title: str, expr: str, known_series: set[str]) -> None:
    unknown = metric_names(expr) - known_series
    assert not unknown, f"metric names no engine, router or operator exports: {unknown}"


@pytest.mark.parametrize("expr", RULE_EXPRS)
def test_rule_names_exist(expr: str, known_series: set[str]) -> None:
    assert not metric_names(expr) - known_series


def test_variable_queries_use_known_series(known_series: set[str]) -> None:
    for dash in DASHBOARDS.values():
        for v in dash.variables:
            inner = re.fullmatch(r"label_values\((.*), (\w+)\)", v.query)
            assert inner, v.query
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", inner.group(1))
            assert name and name.group(0) in known_series


def test_every_query_parses(promtool: str, tmp_path: Path) -> None:
    """promtool's real PromQL parser over every expanded dashboard query (as recording rules)."""
    rules = [{"record": f"check:q{i}", "expr": expand(expr)} for i, (_, _, expr) in enumerate(QUERIES)]
    rules += [
        {"record": f"check:v{i}", "expr": expand(v.query[len("label_values(") :].rsplit(",", 1)[0])}
        for i, v in enumerate(v for d in DASHBOARDS.values() for v in d.variables)
    ]
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    result = run_promtool(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_contract_document_lists_every_operator_series(repo_root: Path) -> None:
    doc = (repo_root / "dashboards" / "CONTRACT.md").read_text()
    for name, (kind, labels) in CONTRACT.items():
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row, f"{name} missing from CONTRACT.md"
        assert f"| {kind} |" in row
        for label in labels:
            assert f"`{label}`" in row
    used = {n for expr in RULE_EXPRS + [q for _, _, q in QUERIES] for n in metric_names(expr)}
    assert {n for n in used if n.startswith("kvstack_operator_")} <= set(CONTRACT)


def _committed_panels(repo_root: Path) -> list[tuple[str, dict[str, object]]]:
    """Every non-row panel of every dashboard JSON file the repository and the chart ship."""
    import json

    out = []
    for folder in ("dashboards/json", "helm/kvstack/files/dashboards"):
        for path in sorted((repo_root / folder).glob("*.json")):
            for panel in json.loads(path.read_text())["panels"]:
                if panel["type"] != "row":
                    out.append((f"{folder}/{path.name}:{panel['title']}", panel))
    return out


def test_every_shipped_panel_has_a_description_and_parsing_queries(
    repo_root: Path, promtool: str, tmp_path: Path
) -> None:
    """What Grafana loads (the committed JSON, not the Python): descriptions and promtool-valid PromQL."""
    panels = _committed_panels(repo_root)
    assert len({where.split(":")[0] for where, _ in panels}) >= len(DASHBOARDS)
    missing = [where for where, p in panels if not str(p.get("description", "")).strip()]
    assert not missing, f"panels without a description: {missing}"
    exprs = [t["expr"] for _, p in panels for t in p["targets"]]  # type: ignore[attr-defined]
    assert all(exprs), "a target without an expression"
    rules = [{"record": f"check:json{i}", "expr": expand(e)} for i, e in enumerate(exprs)]
    path = tmp_path / "json-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "json", "rules": rules}]}))
    result = run_promtool(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def _tile(title: str) -> str:
    return next(q.expr for p in DASHBOARDS["overview"].panels() if p.title == title for q in p.queries)


@pytest.mark.parametrize(
    ("series", "expected"),
    [
        # traffic, never a 5xx (no status="503" series exists at all): 0, not "No traffic"
        ({'status="200"': "0+60x10"}, [0.0]),
        # one answer in eleven fails
        ({'status="200"': "0+60x10", 'status="503"': "0+6x10"}, [6 / 66]),
        # no traffic in the window: empty, which the tile shows as "No traffic"
        ({'status="200"': "5x10"}, []),
    ],
    ids=["traffic-without-errors", "some-errors", "idle"],
)
def test_router_5xx_ratio_tile_under_prometheus(
    promtool: str, tmp_path: Path, series: dict[str, str], expected: list[float]
) -> None:
    """The tile's real expression evaluated by Prometheus' rule engine (promtool test rules)."""
    rule = {"record": "tile", "expr": expand(_tile("Router 5xx ratio"), "2m")}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "t", "rules": [rule]}]}))
    labels = 'model_name="m", namespace="ns", engine="e"'
    test = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": f"kvstack_router_requests_total{{{labels}, {status}}}", "values": values}
                    for status, values in series.items()
                ],
                "promql_expr_test": [
                    {
                        "expr": "tile",
                        "eval_time": "8m",
                        "exp_samples": [{"labels": "tile", "value": v} for v in expected],
                    }
                ],
            }
        ],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test))
    result = run_promtool(promtool, "test", "rules", str(tmp_path / "test.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
