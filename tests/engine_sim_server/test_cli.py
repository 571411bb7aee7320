"""``kvstack engine sim`` as a user runs it: bad values exit 2 naming the field; a config file works."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest
from tests.engine_sim_server.conftest import KVSTACK, run_sim


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--block-size", "0"], "block_size"),
        (["--speed", "-1"], "speed"),
        (["--gpu-share", "2"], "gpu_share"),
        (["--long-prefill-token-threshold", "-1"], "long_prefill_token_threshold"),
        (["--gpu-peers-dir", "/tmp/gpu"], "shared_gpu"),  # without a share_by_busy table from --config
        (["--lmcache-store-us-per-token", "-1"], "lmcache.store_us_per_token"),
        (["--lmcache-remote-url", "http://nope"], "lmcache.remote_url"),
        (["--kv-events-endpoint", "127.0.0.1:5557"], "kv_events_endpoint"),
        (["--log-level", "loud"], "log_level"),
    ],
)
def test_bad_flag_exits_2_naming_the_field(args: list[str], field: str) -> None:
    r = subprocess.run([str(KVSTACK), "engine", "sim", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ")
    assert field in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_config_file_field_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "sim.yaml"
    cfg.write_text("max_num_seqs: lots\nserver:\n  port: 80000\n")
    r = subprocess.run(
        [str(KVSTACK), "engine", "sim", "--config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert "max_num_seqs" in r.stderr


def test_config_file_with_flag_override(tmp_path: Path) -> None:
    cfg = tmp_path / "sim.yaml"
    cfg.write_text("max_model_len: 3000\nnum_gpu_blocks: 400\nspeed: 20\nserver:\n  api_key: from-file\n")
    with run_sim("--config", str(cfg), "--max-model-len", "1024", "--api-key", "from-flag") as s:
        auth = {"Authorization": "Bearer from-flag"}
        card = httpx.get(f"{s.base_url}/models", headers=auth).json()["data"][0]
        assert card["max_model_len"] == 1024  # the flag wins over the file
        text = s.metrics()
        assert 'num_gpu_blocks="400"' in text  # the file's value holds where no flag is given
        assert (
            httpx.get(f"{s.base_url}/models", headers={"Authorization": "Bearer from-file"}).status_code
            == 401
        )


def test_host_flag_is_the_bound_address() -> None:
    # Pods bind 0.0.0.0; tests may bind loopback only, so another loopback address proves the flag
    # reaches the socket: the simulator answers there and not on 127.0.0.1.
    with run_sim(
        "--speed", "50", "--max-model-len", "1024", "--num-gpu-blocks", "100", host="127.0.0.2"
    ) as s:
        assert s.url.startswith("http://127.0.0.2:")
        assert httpx.get(f"{s.url}/health").status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{s.port}/health")


def test_help_groups_the_flags() -> None:
    r = subprocess.run(
        [str(KVSTACK), "engine", "sim", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )
    assert r.returncode == 0
    for panel in ("Server", "Engine (vLLM flags)", "LMCache connector", "KV events"):
        assert panel in r.stdout
    assert "0.0.0.0 in a pod" in r.stdout and "--lmcache-kv-events" in r.stdout
    for flag in ("--gpu-share", "--token-cost-scale", "--lmcache-store-us-per-token"):
        assert flag in r.stdout
