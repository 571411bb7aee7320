"""Shared helpers for the observability tests: known metric names and a promtool runner."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kvstack.dashboards.adapters import VLLM_LORA_SERIES
from kvstack.dashboards.autoscaler import CONTRACT
from kvstack.router.engines import EngineRegistry
from kvstack.router.metrics import RouterMetrics

PROMTOOL = shutil.which("promtool")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def router_series() -> set[str]:
    """Every sample name a cache-aware router exposes (read off the real app's registry)."""
    from kvstack.router.app import create_app
    from kvstack.router.config import RouterSettings

    app = create_app(RouterSettings(policy="cache_aware"))
    names: set[str] = set()
    for family in app.app.state.ctx.metrics.registry.collect():
        names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
    return names


def router_model_series() -> set[str]:
    """Router series labelled with ``model_name`` (the ones the ``$model`` filter applies to)."""
    from prometheus_client.metrics import MetricWrapperBase

    metrics = RouterMetrics(EngineRegistry(), time.monotonic)
    out: set[str] = set()
    for m in vars(metrics).values():
        if isinstance(m, MetricWrapperBase) and "model_name" in m._labelnames:
            out.update(m._name + s for s in SUFFIXES.get(m._type, ("",)))
    return out


def vllm_series(reference_dir: Path) -> set[str]:
    """Every sample name in the scrape of a real vLLM 0.24 server."""
    text = (reference_dir / "vllm-0.24-metrics.txt").read_text()
    return set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, flags=re.M))


def exporter_series(reference_dir: Path) -> set[str]:
    """LMCache's and redis_exporter's sample names (the reference file lists them, one a line)."""
    lines = (reference_dir / "exporter-metric-names.txt").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def operator_series() -> set[str]:
    return {name for name in CONTRACT}


@pytest.fixture(scope="session")
def known_series(reference_dir: Path) -> set[str]:
    from kvstack.dashboards.rules import RECORDS

    return (
        vllm_series(reference_dir)
        | VLLM_LORA_SERIES
        | router_series()
        | operator_series()
        | {r.record for r in RECORDS}
        | exporter_series(reference_dir)
        # scrape health
        | {"up"}
    )


@pytest.fixture(scope="session")
def promtool() -> str:
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (Debian: prometheus)")
    return PROMTOOL


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
