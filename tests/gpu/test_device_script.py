"""scripts/gpu/device.sh writes each engine's `kvstack engine serve` config on the GPU machine; a config
that `engine serve` refuses costs a whole device call there (every engine waits out its start timeout),
so every variant it can write is validated here with --dry-run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts/gpu/device.sh"


def engine_yaml(index: int, env: dict[str, str]) -> str:
    """The script's own engine_yaml function, run alone (the script itself installs a wheel first)."""
    body = f'source <(sed -n "/^engine_yaml()/,/^}}/p" {SCRIPT}); engine_yaml {index}'
    return subprocess.run(
        ["bash", "-c", body], env={**os.environ, **env}, check=True, capture_output=True, text=True
    ).stdout


@pytest.mark.parametrize(
    "env",
    [
        {"LMCACHE": "1", "GPU_UTIL": "0.3", "REDIS_PORT": "6390", "LMCACHE_CPU_GB": "20"},
        {"LMCACHE": "0", "GPU_UTIL": "0.15"},
        {
            "LMCACHE": "1",
            "GPU_UTIL": "0.15",
            "REDIS_PORT": "6390",
            "LMCACHE_CPU_GB": "10",
            "ENGINE_ARGS": "--enforce-eager",
        },
        {"LMCACHE": "0", "GPU_UTIL": "0.2", "ENGINE_ARGS": '--max-num-seqs, "64"'},
        {"LMCACHE": "1", "GPU_UTIL": "0.2", "REDIS_PORT": "6390", "LMCACHE_CPU_GB": "20", "DEV_MODE": "0"},
    ],
)
@pytest.mark.parametrize("index", [0, 3])
def test_engine_serve_accepts_every_config_device_sh_writes(
    tmp_path: Path, env: dict[str, str], index: int
) -> None:
    config = tmp_path / "engine.yaml"
    config.write_text(engine_yaml(index, env))
    done = subprocess.run(
        [sys.executable, "-m", "kvstack", "engine", "serve", "--config", str(config), "--dry-run"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert f"--port {8100 + index}" in done.stdout or f"--port' '{8100 + index}" in done.stdout
    assert ("LMCacheConnectorV1" in done.stdout) == (env["LMCACHE"] == "1")
    # the matrix resets the engines' prefix caches between cases: dev mode unless turned off
    assert ("VLLM_SERVER_DEV_MODE" in done.stdout) == (env.get("DEV_MODE", "1") == "1")
