"""Clusters left behind by a killed test run are found by their dead owner, killed and removed."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from kvstack.common.waits import wait_until
from kvstack_testing.workdirs import OWNER_FILE, WORKDIR_PREFIX, end_processes, pid_alive, reap_stale_clusters


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def workdir(root: Path, name: str, owner: int) -> Path:
    path = root / f"{WORKDIR_PREFIX}{name}"
    (path / "clusters" / "c" / "pids").mkdir(parents=True)
    (path / OWNER_FILE).write_text(str(owner))
    return path


def test_reaps_only_clusters_whose_owner_died(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTACK_CACHE", str(tmp_path / "cache"))
    stale = workdir(tmp_path, "stale", dead_pid())
    live = workdir(tmp_path, "live", os.getpid())
    leftover = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (stale / "clusters" / "c" / "pids" / "etcd.pid").write_text(str(leftover.pid))
        assert reap_stale_clusters(tmp_path) == [stale]
        assert leftover.wait(timeout=10) != 0  # killed, not finished
        assert not stale.exists()
        assert live.exists()
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()


def test_named_workdirs_in_the_cache_are_reaped_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTACK_CACHE", str(tmp_path / "cache"))
    named = tmp_path / "cache" / "clusters" / "dev"
    named.mkdir(parents=True)
    (named / OWNER_FILE).write_text(str(dead_pid()))
    assert reap_stale_clusters(tmp_path / "empty-tmp") == [named]
    assert not named.exists()


def test_end_processes_kills_what_outlives_the_grace_period() -> None:
    # A shell that ignores SIGTERM and has a child in its process group: both must go.
    proc = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 60 & wait"], start_new_session=True)
    try:
        time.sleep(0.2)
        child = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        end_processes([proc.pid], grace=0.3)
        assert proc.wait(timeout=10) == -9
        wait_until(lambda: not pid_alive(child), "the child to be reaped", timeout=10, interval=0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
