"""``make cluster`` / ``make cluster-clean`` (``python -m kvstack_testing``): foreground cluster, cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvstack_testing import Toolchain
from kvstack_testing.cluster import pid_alive

pytestmark = pytest.mark.cluster


def test_foreground_cluster_stops_on_ctrl_c(cluster_tools: Toolchain, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "KVSTACK_CACHE": str(tmp_path),
        "KVSTACK_CLUSTER_NAME": "cli",
        "KVSTACK_CLUSTER_GPU_NODES": "1",
    }
    # The binaries stay where they are; only the cluster's work dir moves under tmp_path.
    (tmp_path / "bin").symlink_to(cluster_tools.bin_root)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstack_testing", "cluster", "--sims", ""],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops the cluster" in line:
                break
        text = "".join(lines)
        kubeconfig = tmp_path / "clusters" / "cli" / "kubeconfig.yaml"
        assert f"export KUBECONFIG={kubeconfig}" in text, text
        assert f"Kubernetes v{cluster_tools.kubernetes}" in text
        pids = [int(p.read_text()) for p in kubeconfig.parent.glob("clusters/*/pids/*.pid")]
        assert len(pids) >= 5
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert [pid for pid in pids if pid_alive(pid)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_clean_removes_clusters_of_dead_owners(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / "kvstack-cluster-stale"
    stale.mkdir()
    (stale / "owner.pid").write_text(str(dead.pid))
    env = {**os.environ, "KVSTACK_CACHE": str(tmp_path / "cache"), "TMPDIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "kvstack_testing", "clean"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == f"removed {stale}\n"
    assert not stale.exists()
