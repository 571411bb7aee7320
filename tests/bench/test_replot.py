"""``kvstack bench replot``: each committed results file draws its figure again, bad input is refused
without a traceback, and bar axes never cut a bar off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kvstack.bench.cli import app
from kvstack.bench.replot import ReplotError, kind_of
from kvstack.bench.report import value_axis

RESULTS = Path(__file__).resolve().parents[2] / "bench-results"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        ({"benchmark": "soak", "minutes": []}, "soak"),
        ({"benchmark": "router_overhead", "verdicts": []}, "router_overhead"),
        ({"setup": {}, "rows": [], "goals": []}, "routing"),
        ({"label": "h200-sp", "meta": {}, "cases": []}, "gpu"),
        ({"meta": {}, "ramp": [], "fairness": [], "priority": [], "goals": []}, "flow"),
    ],
)
def test_kind_of_a_results_file(payload: dict[str, Any], kind: str) -> None:
    assert kind_of(payload) == kind


@pytest.mark.parametrize("payload", [{}, {"benchmark": "sim_throughput"}, {"rows": []}, {"cases": []}])
def test_a_file_no_figure_comes_from_is_refused(payload: dict[str, Any]) -> None:
    with pytest.raises(ReplotError, match="not a routing, soak"):
        kind_of(payload)


@pytest.mark.parametrize(
    "files",
    [
        ["routing/results.json"],
        ["soak/soak-5min.json"],
        ["router/router_overhead.json"],
        ["router/sglang-baseline/router_overhead.json"],  # no soak in that run: the RSS panel says so
        ["gpu/h200-r2-sp.json", "gpu/h200-r2-mrqa.json"],
        ["flow/flow15-ramp-long.json"],
        # one policy per device call on the H200: both in one figure
        ["gpu/r15/h200-flow-kvstack.json", "gpu/r15/h200-flow-sglang.json"],
    ],
)
def test_committed_results_draw_again(files: list[str], tmp_path: Path) -> None:
    png = tmp_path / "figure.png"
    result = CliRunner().invoke(app, ["replot", *(str(RESULTS / f) for f in files), "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["soak/soak-30min.png"], "is not a JSON results file"),
        (["soak/soak-5min.json", "router/router_overhead.json"], "files of different benchmarks"),
        (["soak/soak-5min.json", "soak/soak-30min.json"], "one soak results file at a time"),
    ],
)
def test_bad_input_is_an_error_not_a_traceback(files: list[str], message: str, tmp_path: Path) -> None:
    args = ["replot", *(str(RESULTS / f) for f in files), "--png", str(tmp_path / "x.png")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("values", "ref", "log_ok", "scale"),
    [
        # the routing plot's case: 790 and 2,741 ms next to bars near 80 ms
        ([78.9, 81.5, 68.5, 790.0, 24.3], None, True, "log"),
        ([80.6, 103.0, 68.7, 2741.0, 24.7], None, True, "log"),
        ([106.0, 141.0, 145.0, 24.1, 24.0], None, True, "linear"),  # no outlier
        ([78.9, 790.0], None, False, "linear"),  # a metric not allowed a log axis
        ([0.5, 0.53, 0.77, 0.48, 0.85], 0.87, False, "linear"),  # hit rates under the oracle line
        ([0.0, 0.0], None, True, "linear"),
    ],
)
def test_bar_axes_hold_every_bar_and_the_reference(
    values: list[float], ref: float | None, log_ok: bool, scale: str
) -> None:
    got, bottom, top = value_axis(values, ref, log_ok)
    assert got == scale
    assert top > max([*values, ref or 0.0])  # nothing cut off, room for the labels
    if scale == "log":
        assert 0 < bottom < min(v for v in values if v > 0)
    else:
        assert bottom == 0
