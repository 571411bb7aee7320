"""The Autoscaler dashboard and the operator alerts, run by a real Prometheus scraping a real operator.

The observability live test (tests/observability/test_live.py) covers every other query on a local
stack; the ``kvstack_operator_*`` ones need the operator, so they run here: the operator under
KopfRunner serving /metrics, a KVStack autoscaled against PodSimulators, and Prometheus scraping both
(the operator as job ``kvstack-operator`` with ``honor_labels``) and evaluating the generated rules.
"""

from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvstack.common.procs import ManagedProcess, free_port, running
from kvstack.common.waits import wait_until
from kvstack.dashboards.catalog import dashboards
from kvstack.dashboards.promql import expand, metric_names
from kvstack.dashboards.rules import ALERTS, RECORDS
from kvstack.observability.prometheus import PrometheusAPI, Target, prometheus_process, prometheus_url
from kvstack.operator.runtime import Runtime
from kvstack_testing import Cluster, PodSimulators, SimulatorTargets, operator_runner, operator_settings

from .conftest import Api, evaluations
from .test_autoscale_cluster import MODEL

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(300)]


def _needs_operator(expr: str) -> bool:
    return any(n.startswith("kvstack_operator_") for n in metric_names(expr))


AUTOSCALER = dashboards()["autoscaler"]
# Every Autoscaler query, and the operator queries of the other dashboards (Overview's replica panel).
QUERIES = [
    (f"{stem}: {p.title}", expand(q.expr, "15s"))
    for stem, d in dashboards().items()
    for p in d.panels()
    for q in p.queries
    if stem == "autoscaler" or _needs_operator(q.expr)
]
OPERATOR_RECORDS = [r.record for r in RECORDS if _needs_operator(r.expr)]
OPERATOR_ALERTS = [a for a in ALERTS if _needs_operator(a.expr)]

# A top-level comparison: PromQL needs no spaces around one, but every rule here is written with them
# (a matcher such as direction="up" has none, so it never matches).
_COMPARISON = re.compile(r"\s(==|!=|>=|<=|>|<)\s")
_LITERAL = re.compile(r"[\d.()*\s]+")  # a threshold: 300, 0, 2, (14.4 * 0.01)


def operands(expr: str) -> list[str]:
    """The non-literal sides of each comparison in ``expr`` (``a > 300 and b >= c`` -> a, b, c).

    An alert's expression is a condition: it is empty while the alert is (rightly) silent, so
    "returns data" is asked of what it compares. Each side of every ``and``-joined comparison that
    is not a numeric threshold must return data; the whole expression must evaluate without error.
    """
    found: list[str] = []
    for part in expr.split(" and "):
        sides = _COMPARISON.split(part)
        assert len(sides) in (1, 3), f"more than one comparison in {part!r}: extend operands()"
        found += [s.strip() for s in sides[::2] if not _LITERAL.fullmatch(s)]
    return found


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("time() - x > 300", ["time() - x"]),
        ("a > b", ["a", "b"]),
        ("max(up) == 0", ["max(up)"]),
        ('sum(x{d="up"}) >= 2 and sum(y) >= (6 * 0.01)', ['sum(x{d="up"})', "sum(y)"]),
        ("sum by (a) (rate(x[5m]))", ["sum by (a) (rate(x[5m]))"]),
    ],
)
def test_operands(expr: str, expected: list[str]) -> None:
    assert operands(expr) == expected


def prometheus(workdir: Path, operator_port: int, engines_file: Path) -> ManagedProcess:
    """Prometheus as ``kvstack up --prometheus`` configures it for the operator, plus the engine pods
    as file_sd targets (their IPs come and go with the autoscaler), evaluating the packaged rules."""
    operator = Target("kvstack-operator", f"http://127.0.0.1:{operator_port}", "kvstack-operator")
    return prometheus_process(
        workdir, [operator], free_port(), scrape_interval="1s", file_sd={"kvstack-engine": engines_file}
    )


def finite(prom: PrometheusAPI, expr: str) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in prom.query(expr))


def missing(prom: PrometheusAPI, exprs: list[tuple[str, str]], timeout: float = 20.0) -> list[str]:
    """Those of ``(name, expr)`` with no finite sample within ``timeout`` (a bad query raises)."""
    failed: list[str] = []
    for name, expr in exprs:
        try:
            wait_until(partial(finite, prom, expr), expr, timeout=timeout)
        except AssertionError:
            failed.append(f"{name}: {expr} -> {prom.query(expr)}")
    return failed


def rule_health(base_url: str) -> dict[str, tuple[str, str]]:
    """Rule name -> (health, lastError) of every loaded rule, from /api/v1/rules."""
    groups = httpx.get(f"{base_url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    return {r["name"]: (r["health"], r.get("lastError", "")) for g in groups for r in g["rules"]}


@pytest.mark.usefixtures("kubeconfig_env")
def test_autoscaler_queries_and_operator_rules_return_data(
    cluster: Cluster, namespace: str, api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(OPERATOR_ALERTS) >= 4 and QUERIES  # the selection itself must not silently shrink to nothing
    engines_file = tmp_path / "engines.json"
    metrics_port = free_port()
    proc = prometheus(tmp_path / "prometheus", metrics_port, engines_file)
    url = prometheus_url(proc)
    prom = PrometheusAPI(url)
    runtime = Runtime(
        operator_settings(
            cluster, namespace, metrics_host="127.0.0.1", metrics_port=metrics_port, prometheus_url=url
        )
    )
    spec: dict[str, Any] = {
        "models": [
            {
                "name": "llama",
                "model": MODEL,
                "minReplicas": 1,
                "maxReplicas": 2,
                # one LoRA adapter: the operator's kvstack_operator_lora_* series and their alert
                "podAnnotations": {"sim.kvstack.io/model": MODEL, "sim.kvstack.io/args": "--enable-lora"},
                "lora": {"adapters": [{"name": "sql", "source": "kvstack/sql-lora"}]},
            }
        ],
        "router": {"enabled": False},
        "cache": {"mode": "none"},
        "autoscaling": {"intervalSeconds": 2},
    }
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")  # the simulators inherit it
    sims = PodSimulators(cluster.credentials(), "app.kubernetes.io/component=engine", namespace=namespace)
    with (
        running([proc], timeout=60),
        sims,
        SimulatorTargets(sims, engines_file),
        operator_runner(runtime, namespace) as runner,
    ):
        api.create("demo", spec)
        sims.wait_for(1, timeout=90)
        # A few evaluations on the engine's data: the signal is only exported from a successful query.
        wait_until(lambda: evaluations(runtime) >= 3, "three evaluations")
        signal = prom.wait_for("kvstack_operator_scaling_signal", timeout=30)
        # honor_labels: the series keep the model's namespace (no exported_namespace).
        assert {(s["metric"]["namespace"], s["metric"]["model_name"]) for s in signal} == {(namespace, MODEL)}
        assert not any("exported_namespace" in s["metric"] for s in signal)

        failed = missing(prom, QUERIES)
        failed += missing(prom, [(r, r) for r in OPERATOR_RECORDS])
        failed += missing(prom, [(a.alert, o) for a in OPERATOR_ALERTS for o in operands(a.expr)])
        for var in AUTOSCALER.variables:
            m = re.fullmatch(r"label_values\((.*), (\w+)\)", var.query)
            assert m, var.query
            values = {s["metric"].get(m.group(2)) for s in prom.query(expand(m.group(1)))}
            if not values - {None}:
                failed.append(f"variable {var.query}: no {m.group(2)} label")
        assert not failed, "\n".join(failed)

        # Prometheus loaded the rules file and evaluated each operator rule without error.
        names = OPERATOR_RECORDS + [a.alert for a in OPERATOR_ALERTS]
        health = wait_until(
            lambda: (h := rule_health(url)) and all(h.get(n, ("",))[0] == "ok" for n in names) and h,
            "every operator rule evaluated",
            timeout=20,
        )
        assert {n: health[n] for n in names} == {n: ("ok", "") for n in names}
        # The Prometheus the operator asks is the one checked here, and it answers.
        assert prom.query("min(kvstack_operator_prometheus_up)")[0]["value"][1] == "1"
    assert runner.exception is None, runner.output
