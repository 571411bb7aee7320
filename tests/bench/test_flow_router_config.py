"""The flow benchmark's router configs are accepted by the real router settings, in wall time."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kvstack.bench.cli import app
from kvstack.bench.flow import scenarios_of
from kvstack.bench.flow_plan import POLICIES
from kvstack.bench.flow_stack import FlowSetup, router_config, stack
from kvstack.router.config import RouterSettings


@pytest.mark.parametrize("policy", POLICIES, ids=[p.name for p in POLICIES])
def test_every_policy_config_loads(policy: object) -> None:
    setup = FlowSetup(speed=0.5, sim_config=None)
    settings = RouterSettings(**router_config(setup, policy))  # type: ignore[arg-type]
    fc = settings.flow_control
    assert fc.enabled == policy.flow  # type: ignore[attr-defined]
    if fc.enabled:
        # objectives and the engines' prefill rate in the router's clock: a simulated second is 2 s
        assert {c.name: c.ttft_objective_s for c in fc.classes} == {
            "interactive": 2.0,
            "default": 2.0,
            "batch": None,
        }
        assert (fc.saturation.prefill_tokens_per_s, fc.saturation.prefill_target_s) == (1050.0, 1.0)
        assert [t.name for t in fc.tenants] == ["A", "B"]


def test_the_router_s_own_tokenizer_and_the_decision_log(tmp_path: Path) -> None:
    setup = FlowSetup(
        speed=1.0, sim_config=None, tokenizer="local", tokenizer_path=tmp_path, decision_log=True
    )
    settings = RouterSettings(**router_config(setup, POLICIES[-1]))
    assert (settings.tokenizer, settings.tokenizer_path, settings.log_level) == ("local", tmp_path, "debug")
    plain = RouterSettings(**router_config(FlowSetup(sim_config=None), POLICIES[-1]))
    assert (plain.tokenizer, plain.tokenizer_path, plain.log_level) == ("builtin", None, "warning")


@pytest.mark.parametrize("ordering", ["fcfs", "edf", "cheapest"])
def test_the_queue_order_reaches_the_router(ordering: str) -> None:
    setup = FlowSetup(sim_config=None, ordering=ordering)
    settings = RouterSettings(**router_config(setup, POLICIES[-1]))
    assert [(m.model, m.ordering) for m in settings.flow_control.models] == [("*", ordering)]


@pytest.mark.parametrize(
    ("memory_s", "speed", "expected"), [(None, 0.5, 2.0), (0.0, 0.5, 0.0), (1.5, 0.5, 3.0)]
)
def test_the_overload_memory_reaches_the_router_in_wall_time(
    memory_s: float | None, speed: float, expected: float
) -> None:
    """None keeps the router's default (2 s); a simulated second lasts ``1 / speed`` wall seconds."""
    setup = FlowSetup(sim_config=None, overload_memory_s=memory_s, speed=speed)
    settings = RouterSettings(**router_config(setup, POLICIES[-1]))
    assert settings.flow_control.saturation.overload_memory_s == expected


def test_an_unknown_queue_order_is_refused_before_anything_starts() -> None:
    result = CliRunner().invoke(app, ["flow", "--ordering", "lifo"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "unknown ordering 'lifo'" in result.output


REAL = ["--engines-file", "engines.yaml"]  # real engines: a local tokenizer is theirs


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        ([*REAL, "--tokenizer", "local"], "--tokenizer-path"),
        ([*REAL, "--tokenizer", "local", "--tokenizer-path", "/nonexistent/kvstack"], "--tokenizer-path"),
        (["--tokenizer", "hf"], "unknown tokenizer 'hf'"),
        # simulators tokenize with the built-in tokenizer: a local one's ids never match their events
        (["--tokenizer", "local", "--tokenizer-path", "."], "built-in tokenizer"),
    ],
)
def test_bad_tokenizer_options_are_refused_before_anything_starts(args: list[str], complaint: str) -> None:
    result = CliRunner().invoke(app, ["flow", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert complaint in result.output


SHARED = Path(__file__).parents[2] / "bench-results/flow/sim-h200-x4-shared.yaml"
OWN_SHARE = Path(__file__).parents[2] / "bench-results/flow/sim-h200-x4.yaml"


@pytest.mark.parametrize(
    ("sim_config", "shared_device", "device"),
    [(SHARED, True, "sim-gpu-0"), (SHARED, False, None), (OWN_SHARE, True, None)],
)
def test_simulators_on_one_gpu_name_their_device_for_the_router(
    tmp_path: Path, sim_config: Path, shared_device: bool, device: str | None
) -> None:
    setup = FlowSetup(sim_config=sim_config, shared_device=shared_device, log_dir=tmp_path)
    procs, _ = stack(setup, POLICIES[1], "case")  # built, not started
    entries = yaml.safe_load((tmp_path / "case" / "engines.yaml").read_text())
    assert [e.get("device") for e in entries] == [device] * setup.engines
    peers = ["--gpu-peers-dir" in p.argv for p in procs[:-1]]
    assert peers == [sim_config == SHARED] * setup.engines  # the simulators share it either way


def test_the_ramp_runs_the_loads_asked_for() -> None:
    setup = FlowSetup(sim_config=None, capacity_rps=8.0, ramp=(0.5, 2.0))
    ramp = scenarios_of(setup)["ramp"]
    assert [(case, [s.rate for s in streams]) for case, streams in ramp] == [("0.5x", [4.0]), ("2x", [16.0])]


@pytest.mark.parametrize(
    "args",
    [
        ["--lmcache-api", "http://127.0.0.1:7001"],  # its own simulators: nothing to clear per case
        [*REAL, "--keep-cache", "--lmcache-api", "http://127.0.0.1:7001"],
    ],
)
def test_the_lmcache_api_needs_real_engines_reset_per_case(args: list[str]) -> None:
    result = CliRunner().invoke(app, ["flow", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "--lmcache-api" in result.output and "--fresh-cache" in result.output


def test_a_load_must_be_positive() -> None:
    result = CliRunner().invoke(app, ["flow", "--load", "0"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "positive multiple" in result.output


def test_a_run_writes_every_request_s_outcome_beside_its_summary(tmp_path: Path) -> None:
    """``bench flow`` over real simulators: the trace file holds one line per request of the summary,
    each with what the router said of it (engine, admission, predicted TTFT) and its TTFT."""
    result = CliRunner().invoke(
        app,
        [
            "flow",
            "--policy",
            "cache_aware+flow",
            "--scenario",
            "ramp",
            "--load",
            "0.5",
            "--capacity-rps",
            "4",
            "--duration-s",
            "2",
            "--speed",
            "1",
            "--label",
            "t",
            "--out",
            str(tmp_path),
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "flow/t.json").read_text())
    [row] = summary["ramp"]
    with gzip.open(tmp_path / "flow/t.trace.jsonl.gz", "rt") as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == row["requests"] > 0
    assert {(r["scenario"], r["case"], r["policy"]) for r in lines} == {("ramp", "0.5x", "cache_aware+flow")}
    served = [r for r in lines if r["ok"]]
    assert len(served) == row["completed"]
    assert all(r["engine"] and r["admission"] and r["ttft_s"] > 0 for r in served)
