"""The operator's metrics against dashboards/CONTRACT.md, its settings, and its CLI's config errors."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from kvstack.cli import app
from kvstack.operator.autoscale import DIRECTIONS, REASONS, Decision
from kvstack.operator.metrics import OperatorMetrics
from kvstack.operator.settings import load_settings

from ..conftest import free_port


def contract(repo_root: Path) -> dict[str, tuple[str, set[str]]]:
    """name -> (type, labels) from the contract's table."""
    rows = re.findall(
        r"^\| `(kvstack_operator_\w+)` \| (\w+) \| ([^|]*) \|",
        (repo_root / "dashboards" / "CONTRACT.md").read_text(),
        re.M,
    )
    return {name: (kind, set(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}


def test_series_match_the_contract(repo_root: Path) -> None:
    metrics = OperatorMetrics()
    decision = Decision(3, "up", "queue", "m", ())
    metrics.record("ns", "llama", decision, current=2, ready=2, signal=("waiting_per_replica", 4.0), now=1.0)
    metrics.error("ns", "llama", "query", now=2.0)
    metrics.prometheus_up.set(1)
    metrics.lora_operation("ns", "llama", "load", ok=False)
    exported = {
        m.name: (m.type, {k for s in m.samples for k in s.labels}) for m in metrics.registry.collect()
    }
    wanted = contract(repo_root)
    assert wanted, "no kvstack_operator_* rows found in CONTRACT.md"
    for name, (kind, labels) in wanted.items():
        base = name.removesuffix("_total")
        assert base in exported, name
        assert exported[base] == (kind, labels), name
    assert set(exported) == {n.removesuffix("_total") for n in wanted}


def test_every_direction_and_reason_exists_at_zero_from_the_start() -> None:
    metrics = OperatorMetrics()
    metrics.record("ns", "m", Decision(1, "none", "steady", "", ()), 1, 1, None, 1.0)
    get = metrics.registry.get_sample_value
    for direction in DIRECTIONS:
        for reason in REASONS:
            value = get(
                "kvstack_operator_scaling_decisions_total",
                {"namespace": "ns", "model_name": "m", "direction": direction, "reason": reason},
            )
            assert value == (1.0 if (direction, reason) == ("none", "steady") else 0.0)


def test_forget_drops_a_models_series() -> None:
    metrics = OperatorMetrics()
    metrics.record("ns", "m", Decision(1, "none", "steady", "", ()), 1, 1, ("kv_usage", 0.5), 1.0)
    metrics.forget("ns", "m")
    names = {s.labels.get("model_name") for m in metrics.registry.collect() for s in m.samples}
    assert "m" not in names


def test_metrics_are_served_over_http() -> None:
    metrics = OperatorMetrics()
    metrics.prometheus_up.set(0)
    port = free_port()
    stop = metrics.serve(port, host="127.0.0.1")
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        stop()
    assert "kvstack_operator_prometheus_up 0.0" in text


@pytest.mark.parametrize(
    ("env", "overrides", "watched"),
    [
        ({}, {}, []),
        ({"KVSTACK_OPERATOR_NAMESPACE": "serving"}, {}, ["serving"]),
        ({"KVSTACK_OPERATOR_NAMESPACES": "a, b"}, {}, ["a", "b"]),
        ({"KVSTACK_OPERATOR_NAMESPACE": "serving"}, {"namespaces": ["x"]}, ["serving", "x"]),
        ({"KVSTACK_OPERATOR_NAMESPACE": "serving"}, {"all_namespaces": True}, []),
    ],
)
def test_watched_namespaces(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], overrides: dict[str, object], watched: list[str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert load_settings(**overrides).watched_namespaces() == watched


@pytest.mark.parametrize(
    ("args", "env", "field"),
    [
        (["--prometheus-url", "ftp://x"], {}, "prometheus_url"),
        ([], {"KVSTACK_OPERATOR_METRICS_PORT": "abc"}, "metrics_port"),
        ([], {"KVSTACK_OPERATOR_TICK_SECONDS": "0"}, "tick_seconds"),
    ],
)
def test_cli_exits_2_naming_the_bad_setting(
    monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str], field: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["operator", *args])
    assert result.exit_code == 2
    assert f"invalid operator settings: {field}" in result.output


def test_lora_operations_exist_at_zero_from_the_first_round() -> None:
    metrics = OperatorMetrics()
    metrics.lora_operation("ns", "m", "load", ok=True)
    get = metrics.registry.get_sample_value
    counts = {
        (op, result): get(
            "kvstack_operator_lora_operations_total",
            {"namespace": "ns", "model_name": "m", "operation": op, "result": result},
        )
        for op in ("load", "unload")
        for result in ("success", "failure")
    }
    assert counts == {
        ("load", "success"): 1.0,
        ("load", "failure"): 0.0,
        ("unload", "success"): 0.0,
        ("unload", "failure"): 0.0,
    }
    metrics.forget("ns", "m")
    assert (
        get(
            "kvstack_operator_lora_operations_total",
            {"namespace": "ns", "model_name": "m", "operation": "load", "result": "success"},
        )
        is None
    )
