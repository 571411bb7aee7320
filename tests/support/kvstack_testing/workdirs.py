"""Bookkeeping of the test clusters on this machine: work dirs, their owners and processes, address ranges.

Each cluster's work dir records the pid of the process that owns it and the pod CIDR it holds, so
concurrent clusters never share addresses and a cluster whose owner died can be found and reaped.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import tempfile
from pathlib import Path

# kwokctl's own port choice counts down from 32767 in every process, so clusters created at the same
# time would collide; kernel-assigned ports (kvstack.common.procs.free_ports) do not.
from kvstack.common.procs import free_ports as free_ports
from kvstack.common.waits import wait_until
from kvstack_testing.tools import cache_root

WORKDIR_PREFIX = "kvstack-cluster-"
OWNER_FILE = "owner.pid"
POD_CIDR_FILE = "pod-cidr"


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def recorded_pids(workdir: Path) -> list[int]:
    """Pids of the processes kwokctl started for clusters under ``workdir`` (one session each)."""
    pids = []
    for pid_file in workdir.glob("clusters/*/pids/*.pid"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(pid_file.read_text().strip())
            if pid > 1:
                pids.append(pid)
    return pids


def end_processes(pids: list[int], grace: float = 10.0) -> None:
    """Wait up to ``grace`` seconds for ``pids`` to exit, then SIGKILL their process groups."""
    with contextlib.suppress(AssertionError):  # past the grace period: killed below
        wait_until(lambda: not any(pid_alive(pid) for pid in pids), "processes to exit", grace, interval=0.1)
    for pid in pids:
        if pid_alive(pid):
            # kwokctl starts each component with setsid, so its pid is also its process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def kill_recorded_processes(workdir: Path) -> list[int]:
    """SIGKILL every process group kwokctl recorded under ``workdir``; returns the pids."""
    pids = recorded_pids(workdir)
    end_processes(pids, grace=0)
    return pids


def choose_pod_cidr(taken: set[str], rng: random.Random | None = None) -> str:
    """A 127.X.0.0/16 (X in 16..254) not in ``taken``; random, so clusters starting together differ."""
    free = [f"127.{x}.0.0/16" for x in range(16, 255) if f"127.{x}.0.0/16" not in taken]
    if not free:
        raise RuntimeError("every 127.X.0.0/16 pod CIDR is taken by a running cluster")
    return (rng or random.Random()).choice(free)


def pod_cidrs_in_use(tmp_root: Path | None = None) -> set[str]:
    """Pod CIDRs of the clusters on this machine whose owner still runs."""
    used = set()
    for workdir in _cluster_workdirs(tmp_root):
        with contextlib.suppress(OSError, ValueError):
            if pid_alive(int((workdir / OWNER_FILE).read_text().strip())):
                used.add((workdir / POD_CIDR_FILE).read_text().strip())
    return used


def _cluster_workdirs(tmp_root: Path | None) -> list[Path]:
    """Working directories the harness may have created: temp dirs and named ones in the cache."""
    root = tmp_root or Path(tempfile.gettempdir())
    return [*root.glob(WORKDIR_PREFIX + "*"), *(cache_root() / "clusters").glob("*")]


def reap_stale_clusters(tmp_root: Path | None = None) -> list[Path]:
    """Kill and remove clusters whose owning process died without stopping them (a killed test run)."""
    reaped = []
    for workdir in _cluster_workdirs(tmp_root):
        owner = workdir / OWNER_FILE
        try:
            alive = pid_alive(int(owner.read_text().strip()))
        except (OSError, ValueError):
            alive = False
        if not alive:
            kill_recorded_processes(workdir)
            shutil.rmtree(workdir, ignore_errors=True)
            reaped.append(workdir)
    return reaped
