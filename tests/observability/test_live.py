"""Every dashboard query and every rule, run by a real Prometheus scraping a loaded local stack.

Parsing a query proves little: the bugs dashboards in the wild ship (missing ``_total``, renamed
metrics, ``model`` vs ``model_name``) only show as empty panels. So each query must return data here.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvstack.common.waits import wait_until
from kvstack.dashboards.catalog import dashboards
from kvstack.dashboards.cli import app
from kvstack.dashboards.preview import render_dashboard
from kvstack.dashboards.promql import expand, metric_names
from kvstack.dashboards.rules import ALERTS, RECORDS
from kvstack.observability.prometheus import PrometheusError

from .stack import MODEL_A, MODEL_B, Stack, live_stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

NO_OPERATOR = (
    "kvstack_operator_* series need a running operator (and a cluster): "
    "tests/operator/test_dashboards_live.py runs these queries and the operator alerts' inputs"
)
QUERIES = [(stem, p.title, q.expr) for stem, d in dashboards().items() for p in d.panels() for q in p.queries]
VARIABLES = [(stem, v.query) for stem, d in dashboards().items() for v in d.variables]
# The operator alerts' inputs: tests/operator/test_dashboards_live.py.
LIVE_ALERTS = [a for a in ALERTS if not a.needs_operator]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Iterator[Stack]:
    with live_stack(tmp_path_factory.mktemp("live"), repo_root) as s:
        yield s


def _needs_operator(expr: str) -> bool:
    return any(n.startswith("kvstack_operator_") for n in metric_names(expr))


def _finite(result: list[dict[str, object]]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result)  # type: ignore[index]


def _remote_lookup(stack: Stack) -> None:
    """One prompt no engine has seen, a few LMCache chunks long: its engine misses its CPU tier and
    looks the chunks up in Redis (the steady load's shared prefix never leaves the CPU tiers)."""
    import uuid

    import httpx

    text = f"{uuid.uuid4()} " + "an unseen document about KV caches " * 150
    body = {"model": MODEL_A, "messages": [{"role": "user", "content": text}], "max_tokens": 2}
    httpx.post(f"{stack.router_url}/v1/chat/completions", json=body, timeout=30)


def _lmcache_retrieve(stack: Stack) -> None:
    """A prompt of a few LMCache chunks that one sim-a engine computes and stores, then the other
    loads from Redis (the engines share the hash seed, as the chart's do): the steady load's prefix
    stays in the GPU caches, so LMCache's retrieve series move only through a request like this."""
    import uuid

    import httpx

    text = f"{uuid.uuid4()} " + "a report both engines read about KV caches " * 120
    body = {"model": MODEL_A, "messages": [{"role": "user", "content": text}], "max_tokens": 2}
    for pod in ("sim-a-0", "sim-a-1"):
        httpx.post(f"{stack.engine_urls[pod]}/v1/chat/completions", json=body, timeout=30)


# Ratios and quantiles of LMCache's retrieves and stores: NaN unless one happened within the window.
_LMCACHE_PER_REQUEST = {
    "lmcache:num_requested_tokens_total",
    "lmcache:time_to_retrieve_bucket",
    "lmcache:time_to_store_bucket",
}


def _wait_finite(stack: Stack, expr: str, timeout: float = 40.0) -> list[dict[str, object]]:
    def finite() -> list[dict[str, object]] | None:
        if "redis_keyspace" in expr:
            _remote_lookup(stack)  # the keyspace ratio exists only while lookups reach Redis
        if metric_names(expr) & _LMCACHE_PER_REQUEST:
            _lmcache_retrieve(stack)
        result: list[dict[str, object]] = stack.prom.query(expr)  # type: ignore[assignment]
        return result if _finite(result) else None

    found: list[dict[str, object]] = wait_until(
        finite, f"finite data for {expr}", timeout=timeout, interval=0.5
    )
    return found


@pytest.mark.parametrize(("stem", "title", "expr"), QUERIES, ids=[f"{s}:{t}" for s, t, _ in QUERIES])
def test_dashboard_query_returns_data(stack: Stack, stem: str, title: str, expr: str) -> None:
    if _needs_operator(expr):
        pytest.skip(NO_OPERATOR)
    if "redis_" in expr and not stack.has_redis_exporter:
        pytest.skip("no redis_exporter here (Debian: prometheus-redis-exporter); promtool parses the query")
    _wait_finite(stack, expand(expr, "15s"))


@pytest.mark.parametrize(("stem", "query"), VARIABLES, ids=[f"{s}:{q}" for s, q in VARIABLES])
def test_variable_values_exist(stack: Stack, stem: str, query: str) -> None:
    m = re.fullmatch(r"label_values\((.*), (\w+)\)", query)
    assert m
    if _needs_operator(m.group(1)):
        pytest.skip(NO_OPERATOR)
    result = stack.prom.wait_for(expand(m.group(1)), timeout=20)
    assert any(s["metric"].get(m.group(2)) for s in result), f"no {m.group(2)} label in {result}"


@pytest.mark.parametrize("record", [r.record for r in RECORDS])
def test_recording_rule_produces_data(stack: Stack, record: str) -> None:
    _wait_finite(stack, record)


@pytest.mark.parametrize(
    ("alert", "expr"),
    [(a.alert, i) for a in LIVE_ALERTS for i in a.inputs],
    ids=[f"{a.alert}:{n}" for a in LIVE_ALERTS for n, _ in enumerate(a.inputs)],
)
def test_alert_inputs_return_data(stack: Stack, alert: str, expr: str) -> None:
    if "redis_up" in expr and not stack.has_redis_exporter:
        pytest.skip("no redis_exporter here (Debian: prometheus-redis-exporter); promtool covers the alert")
    _wait_finite(stack, expr)


@pytest.mark.parametrize("alert", ALERTS, ids=[a.alert for a in ALERTS])
def test_alert_expression_is_accepted_by_prometheus(stack: Stack, alert: object) -> None:
    from kvstack.dashboards.rules import Alert

    assert isinstance(alert, Alert)
    try:
        stack.prom.query(alert.expr)
    except PrometheusError as err:  # pragma: no cover - the failure message is the point
        pytest.fail(str(err))


def test_killed_engine_makes_the_availability_alerts_pending(stack: Stack) -> None:
    down = stack.prom.wait_for(
        f'ALERTS{{alertname="KvstackEngineDown", alertstate="pending", pod="{stack.killed_pod}"}}', timeout=20
    )
    assert len(down) == 1
    no_engine = stack.prom.wait_for('ALERTS{alertname="KvstackModelHasNoEngine"}', timeout=20)
    assert {s["metric"]["model_name"] for s in no_engine} == {MODEL_B}
    # The engines still serving raise nothing.
    others = stack.prom.query(f'ALERTS{{alertname="KvstackEngineDown", pod!="{stack.killed_pod}"}}')
    assert others == []


def test_failure_paths_are_counted(stack: Stack) -> None:
    for expr in (
        "sum(kvstack_router_client_disconnects_total) >= 1",
        'sum(kvstack_router_requests_total{status=~"5.."}) >= 1',
        "sum(kvstack_router_engine_ejections_total) >= 1",
        "sum(kvstack_router_retries_total) >= 1",
    ):
        stack.prom.wait_for(expr, timeout=20)


def test_preview_renders_every_dashboard(stack: Stack, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "preview",
            "--prometheus",
            stack.prom.base_url,
            "--out",
            str(tmp_path),
            "--minutes",
            "2",
            "--step",
            "2",
            "--rate-interval",
            "15s",
        ],
    )
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["autoscaler.png", "engines.png", "overview.png", "router.png"]
    assert all((tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    # KVSTACK_PREVIEW_OUT=DIR keeps the images, to look at them after a run.
    if keep := os.environ.get("KVSTACK_PREVIEW_OUT"):
        shutil.copytree(tmp_path, keep, dirs_exist_ok=True)


def test_preview_reports_an_unreachable_prometheus(tmp_path: Path) -> None:
    from tests.conftest import free_port

    result = CliRunner().invoke(
        app, ["preview", "--prometheus", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "cannot reach Prometheus" in result.output


def test_render_dashboard_writes_a_png(stack: Stack, tmp_path: Path) -> None:
    path = render_dashboard(stack.prom, dashboards()["router"], tmp_path / "r.png", 120, 2, "15s")
    assert path.stat().st_size > 10_000
