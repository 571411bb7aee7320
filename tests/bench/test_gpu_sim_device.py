"""`kvstack bench gpu --sims N --no-shared-device`: simulators that share one GPU, with the router told
or not told so (the A/B of the router's shared-device pricing, bench-results/lmcache section 16)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstack.bench.gpu_procs import sim_procs

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT / "bench-results/gpu/sim-h200-x4-lmc-shared.yaml"  # a shared_gpu table: one GPU for all


@pytest.mark.parametrize(
    ("config", "tell", "device"), [(SHARED, True, True), (SHARED, False, False), (None, True, False)]
)
def test_the_router_is_told_of_the_shared_gpu_unless_not_to(
    tmp_path: Path, config: Path | None, tell: bool, device: bool
) -> None:
    procs, entries = sim_procs(2, "kvstack-8b", None, tmp_path, config, None, tell_device=tell)
    assert len(procs) == len(entries) == 2
    devices = {e.get("device") for e in entries}
    assert (devices != {None}) == device
    if device:
        assert len(devices) == 1  # both on the one GPU
    # the simulators share the GPU either way: only what the router is told changes
    shares = ["--gpu-peers-dir" in p.argv for p in procs]
    assert shares == [config is not None] * 2
