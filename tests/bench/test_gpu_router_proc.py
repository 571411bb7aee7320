"""`kvstack bench gpu`'s router: engines sharing a Redis (`--redis-url`, `--sim-redis`) get a router
that prices a session sent to another engine as LMCache's load from there."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstack.bench.gpu_procs import router_proc
from kvstack.router.config import load_settings


@pytest.mark.parametrize("shared", [False, True])
def test_the_router_counts_gpu_blocks_as_in_the_shared_store_when_the_engines_share_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared: bool
) -> None:
    proc, _ = router_proc(tmp_path / "engines.yaml", "cache_aware", "builtin", tmp_path, shared_store=shared)
    for name, value in proc.env.items():
        if name.startswith("KVSTACK_ROUTER_"):
            monkeypatch.setenv(name, value)
    settings = load_settings(engines=["http://127.0.0.1:1"])
    assert settings.cache_aware.index.shared_store_from_gpu is shared
