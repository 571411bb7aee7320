"""Table-driven tests of the PromQL helpers, variable expansion and the preview's pure formatting."""

from __future__ import annotations

import pytest

from kvstack.dashboards.panels import Panel, Query
from kvstack.dashboards.preview import fmt_value, legend, scale, threshold_color
from kvstack.dashboards.promql import divide, expand, mean, metric_names, quantile, ratio, sum_rate


@pytest.mark.parametrize(
    ("expr", "want"),
    [
        (sum_rate("a_total", sel=""), "sum (rate(a_total[$__rate_interval]))"),
        (sum_rate("a_total", "pod", 'x="1"', "5m"), 'sum by (pod) (rate(a_total{x="1"}[5m]))'),
        (
            quantile(0.9, "h", "model_name", "", "1m"),
            "histogram_quantile(0.9, sum by (le, model_name) (rate(h_bucket[1m])))",
        ),
        (
            quantile(0.5, "h", sel="", window="1m"),
            "histogram_quantile(0.5, sum by (le) (rate(h_bucket[1m])))",
        ),
        (divide("a", "b"), "(a / (b > 0))"),
        (
            ratio("h_total", "q_total", "", "", "1m"),
            "(sum (rate(h_total[1m])) / (sum (rate(q_total[1m])) > 0))",
        ),
        (mean("h", "", "", "1m"), "(sum (rate(h_sum[1m])) / (sum (rate(h_count[1m])) > 0))"),
    ],
)
def test_builders(expr: str, want: str) -> None:
    assert expr == want


@pytest.mark.parametrize(
    ("expr", "kwargs", "want"),
    [
        ('rate(x{model_name=~"$model"}[$__rate_interval])', {}, 'rate(x{model_name=~".*"}[15s])'),
        ('x{namespace=~"${namespace}", pod=~"$pod"}', {}, 'x{namespace=~".*", pod=~".*"}'),
        ("rate(x[$__range])", {"rate_interval": "1m"}, "rate(x[1m])"),
        ('x{model_name=~"$model"}', {"values": {"model": "llama"}}, 'x{model_name=~"llama"}'),
        ('x{le="1.0"} > 0', {}, 'x{le="1.0"} > 0'),
    ],
)
def test_expand_replaces_grafana_variables(expr: str, kwargs: dict[str, object], want: str) -> None:
    assert expand(expr, **kwargs) == want  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("expr", "want"),
    [
        ('sum by (le, pod) (rate(vllm:ttft_bucket{a="b"}[5m]))', {"vllm:ttft_bucket"}),
        ('up{job=~".*"} == 0 or redis_up{x="y"} == 0', {"up", "redis_up"}),
        ("deriv(kvstack:queue:sum[10m])", {"kvstack:queue:sum"}),
        ('time() - max by (m) (ts{a="b"})', {"ts"}),
        ("min(kvstack_operator_prometheus_up) == 0", {"kvstack_operator_prometheus_up"}),
        ("a:b:c > (14.4 * 0.01) and x unless on (model_name, ns) y", {"a:b:c", "x", "y"}),
        ('count(up{job=~"$job"} == 0) or vector(0)', {"up"}),
        ("sum without (le) (rate(h_bucket[5m] offset 1h))", {"h_bucket"}),
    ],
)
def test_metric_names(expr: str, want: set[str]) -> None:
    assert metric_names(expr) == want


@pytest.mark.parametrize(
    ("fmt", "labels", "want"),
    [
        ("p90 {{pod}}", {"pod": "a"}, "p90 a"),
        ("{{ model_name }} {{status}}", {"model_name": "m", "status": "200"}, "m 200"),
        ("{{missing}} x", {}, "x"),
        ("__auto", {"__name__": "n", "b": "2", "a": "1"}, "a=1,b=2"),
        ("", {}, "value"),
    ],
)
def test_legend_format(fmt: str, labels: dict[str, str], want: str) -> None:
    assert legend(fmt, labels) == want


@pytest.mark.parametrize(
    ("unit", "values", "want"),
    [
        ("s", [0.01, 0.2], (1e3, "ms")),
        ("s", [0.5, 3.0], (1.0, "s")),
        ("percentunit", [0.5], (100.0, "%")),
        ("reqps", [3.0], (1.0, "req/s")),
        ("short", [float("nan")], (1.0, "")),
    ],
)
def test_scale(unit: str, values: list[float], want: tuple[float, str]) -> None:
    assert scale(unit, values) == want


@pytest.mark.parametrize(
    ("value", "unit", "want"),
    [(0.0123, "s", "12.3 ms"), (0.5, "percentunit", "50 %"), (1234.0, "short", "1234"), (2.0, "s", "2 s")],
)
def test_fmt_value(value: float, unit: str, want: str) -> None:
    assert fmt_value(value, unit) == want


@pytest.mark.parametrize(("value", "want"), [(0.001, "#2e7d32"), (0.02, "#ef6c00"), (0.05, "#c62828")])
def test_threshold_color(value: float, want: str) -> None:
    panel = Panel(
        "t", [Query("x")], unit="percentunit", description="d", thresholds=((0.01, "orange"), (0.05, "red"))
    )
    assert threshold_color(panel, value) == want
