"""Engines time-slicing one simulated GPU: the share by busy count (pure), the busy markers in a
real folder, and two engines on real event loops slowing each other only while both step."""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path
from typing import Any

import pytest

from kvstack.common.config import ConfigError, build
from kvstack.engine.sim.config import SimConfig
from kvstack.engine.sim.core import SimEngine
from kvstack.engine.sim.gpu_peers import GpuPeers, peers_flags, share_for
from kvstack.engine.sim.types import SimRequest

from .conftest import Recorder


def cfg(**values: Any) -> SimConfig:
    return build(SimConfig, "test config", **values)


@pytest.mark.parametrize(
    ("busy", "table", "share"),
    [
        (1, [0.4, 0.26, 0.17], 0.4),
        (2, [0.4, 0.26, 0.17], 0.26),
        (3, [0.4, 0.26, 0.17], 0.17),
        (6, [0.4, 0.26, 0.17], 0.17),  # past the table: its last entry
        (0, [0.4, 0.26], 0.4),  # counted before its own marker landed: itself at least
        (3, [1.0], 1.0),  # one entry: a fixed share
    ],
)
def test_the_share_follows_the_busy_count(busy: int, table: list[float], share: float) -> None:
    assert share_for(busy, table) == share


def test_busy_markers_are_counted_across_engines_and_cleared(tmp_path: Path) -> None:
    a, b = GpuPeers(tmp_path / "gpu"), GpuPeers(tmp_path / "gpu")
    assert a.count() == 0
    a.set_busy(True)
    a.set_busy(True)  # idempotent
    assert (a.count(), b.count()) == (1, 1)
    b.set_busy(True)
    assert a.count() == 2
    a.set_busy(False)
    assert b.count() == 1
    b.close()
    a.close()  # closing an idle engine is a no-op
    assert list((tmp_path / "gpu").iterdir()) == []


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"shared_gpu": {"peers_dir": "/tmp/x"}}, "shared_gpu"),  # no table to read the share from
        ({"shared_gpu": {"share_by_busy": [0.5, 1.5]}}, "shared_gpu.share_by_busy.1"),
        ({"shared_gpu": {"share_by_busy": [0.0]}}, "shared_gpu.share_by_busy.0"),
        ({"shared_gpu": {"peer_dir": "/tmp/x"}}, "shared_gpu.peer_dir"),
    ],
)
def test_a_bad_shared_gpu_is_refused_by_name(values: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg(**values)
    assert field in str(err.value)


def prompt(n: int, salt: int) -> list[int]:
    return [300 + (salt * 977 + 31 * i) % 9000 for i in range(n)]


async def decode(engine: SimEngine, rid: str, salt: int, tokens: int = 24) -> None:
    async for _ in engine.generate(SimRequest(rid, prompt(32, salt), tokens, ignore_eos=True)):
        pass


async def test_two_engines_on_one_gpu_slow_each_other_only_while_both_step(tmp_path: Path) -> None:
    shared = {"speed": 1.0, "shared_gpu": {"peers_dir": str(tmp_path), "share_by_busy": [1.0, 0.5]}}
    recs = [Recorder(), Recorder()]
    engines = [SimEngine(cfg(**shared), rec) for rec in recs]
    for e in engines:
        await e.start()
    try:
        await decode(engines[0], "alone", 1)  # the other engine idles: the whole GPU
        await asyncio.gather(decode(engines[0], "both-0", 2), decode(engines[1], "both-1", 3))
    finally:
        for e in engines:
            await e.stop()
    (alone, both_0), (both_1,) = (
        [statistics.median(st.inter_token_latencies) for st in r.finished] for r in recs
    )
    assert both_0 == pytest.approx(2 * alone, rel=0.2)
    assert both_1 == pytest.approx(2 * alone, rel=0.2)
    assert engines[0].gpu_peers is not None
    assert engines[0].gpu_peers.count() == 0  # stopped engines leave no marker behind


@pytest.mark.parametrize(
    ("config", "flags"),
    [
        ("shared_gpu:\n  share_by_busy: [0.4, 0.26]\n", True),
        ("gpu_share: 0.13\n", False),  # a fixed share: nothing to share
        ("shared_gpu:\n  share_by_busy: []\n", False),
    ],
)
def test_simulators_launched_together_share_a_folder_when_their_config_has_a_table(
    tmp_path: Path, config: str, flags: bool
) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text(config)
    expected = ["--gpu-peers-dir", str(tmp_path / "gpu")] if flags else []
    assert peers_flags(path, tmp_path / "gpu") == expected
    assert peers_flags(None, tmp_path / "gpu") == []
