"""A small typed builder for Grafana dashboards (schema 39): time series and stat panels.

Every panel has a unit and a description, every query goes through the ``$datasource`` variable,
and the model and namespace filters are template variables, so dashboards built here pass the usual
lint rules (grafana/dashboard-linter's datasource, units and rate-interval rules).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

PanelKind = Literal["timeseries", "stat"]
DS = {"type": "prometheus", "uid": "${datasource}"}
GRID_WIDTH = 24
SCHEMA_VERSION = 39


@dataclass(frozen=True, slots=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    queries: Sequence[Query]
    unit: str  # a Grafana unit id: "s", "percentunit", "reqps", "short", "bytes", ...
    description: str
    kind: PanelKind = "timeseries"
    width: int = 12
    height: int = 8
    stack: bool = False
    min: float | None = 0
    max: float | None = None
    # (value, color) steps above the base color; stat tiles turn orange/red past them.
    thresholds: Sequence[tuple[float, str]] = ()
    no_value: str = "No data"


@dataclass(slots=True)
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Variable:
    """A query variable filled by ``label_values(query)``; multi-select with All = ``.*``."""

    name: str
    label: str
    query: str


@dataclass(slots=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: list[Row]
    variables: Sequence[Variable] = ()
    tags: Sequence[str] = ("kvstack", "vllm")

    def panels(self) -> Iterator[Panel]:
        for row in self.rows:
            yield from row.panels

    def queries(self) -> list[str]:
        return [q.expr for p in self.panels() for q in p.queries]

    def to_json(self) -> dict[str, Any]:
        panels: list[dict[str, Any]] = []
        next_id, y = 1, 0
        for row in self.rows:
            panels.append(
                {
                    "type": "row",
                    "title": row.title,
                    "id": next_id,
                    "collapsed": False,
                    "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                    "panels": [],
                }
            )
            next_id += 1
            y += 1
            x = row_h = 0
            for p in row.panels:
                if x + p.width > GRID_WIDTH:
                    x, y, row_h = 0, y + row_h, 0
                panels.append(_panel_json(p, next_id, x, y))
                next_id += 1
                x += p.width
                row_h = max(row_h, p.height)
            y += row_h
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": list(self.tags),
            # Provisioned from Git: edits in the UI would be lost at the next sync.
            "editable": False,
            "graphTooltip": 1,
            "schemaVersion": SCHEMA_VERSION,
            "version": 1,
            "refresh": "30s",
            "time": {"from": "now-1h", "to": "now"},
            "timezone": "browser",
            "templating": {"list": _variables(self.variables)},
            "annotations": {"list": []},
            "links": [
                {
                    "type": "dashboards",
                    "tags": ["kvstack"],
                    "asDropdown": True,
                    "title": "kvstack",
                    "includeVars": True,
                    "keepTime": True,
                }
            ],
            "panels": panels,
        }


def _variables(extra: Sequence[Variable]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
        },
    ]
    for v in extra:
        out.append(
            {
                "name": v.name,
                "label": v.label,
                "type": "query",
                "datasource": DS,
                "query": {"query": v.query, "refId": f"{v.name}-var"},
                "definition": v.query,
                "includeAll": True,
                "multi": True,
                "allValue": ".*",
                "refresh": 2,
                "sort": 1,
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                "hide": 0,
            }
        )
    return out


def _panel_json(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": p.unit, "noValue": p.no_value}
    if p.min is not None:
        defaults["min"] = p.min
    if p.max is not None:
        defaults["max"] = p.max
    defaults["thresholds"] = {
        "mode": "absolute",
        "steps": [{"color": "green", "value": None}]
        + [{"color": color, "value": value} for value, color in p.thresholds],
    }
    if p.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10 if p.stack else 0,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if p.stack else "none", "group": "A"},
        }
        options: dict[str, Any] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    else:
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
        }
    return {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DS,
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [
            {
                "datasource": DS,
                "expr": q.expr,
                "legendFormat": q.legend or "__auto",
                "refId": chr(65 + i),
                "range": True,
            }
            for i, q in enumerate(p.queries)
        ],
    }
