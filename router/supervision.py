"""The decisions of ``workers: N`` (router/workers.py), pure: how many workers, and what to do when
one exits. The supervisor does the I/O (reading the cgroup, starting processes) around them."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

CONFIG_ERROR: Final = 2  # a worker's exit status for configuration it refused (kvstack's CLI convention)

# ---------------------------------------------------------------------------- how many (pure)


def cpu_quota(cpu_max: str | None) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` line (``"200000 100000"``: 2); None: no quota."""
    if cpu_max is None:
        return None
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cpu_budget(affinity: int, quota: float | None) -> int:
    """Cores this process may use: its CPU affinity, cut to the cgroup quota (rounded up), >= 1."""
    cpus = max(1, affinity)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return cpus


def worker_count(setting: int, cpus: int) -> int:
    """``workers``: N as given; 0 (``auto``): one per usable core."""
    return setting if setting > 0 else max(1, cpus)


# ---------------------------------------------------------------------------- restarts (pure)


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    max_deaths: int = 5  # worker exits within window_s (all workers together) before giving up
    window_s: float = 60.0
    first_delay_s: float = 0.1  # doubled for each recent death, up to max_delay_s
    max_delay_s: float = 5.0


@dataclass(frozen=True, slots=True)
class Restart:
    delay_s: float
    reason: Literal["restart"] = "restart"


@dataclass(frozen=True, slots=True)
class GiveUp:
    deaths: int
    reason: Literal["crash_loop", "config_error"] = "crash_loop"

    @property
    def exit_code(self) -> int:
        """The supervisor's: 2 for configuration a worker refused (as ``kvstack router`` itself), else 1."""
        return CONFIG_ERROR if self.reason == "config_error" else 1


def after_death(
    deaths: Sequence[float], now: float, policy: RestartPolicy, exit_code: int | None = None
) -> Restart | GiveUp:
    """What to do when a worker exits unasked. ``deaths``: the times of worker exits so far,
    this one included. A worker that refused the configuration (exit status 2) would refuse it
    again: give up at once. More than ``max_deaths`` in the last ``window_s``: give up (the
    supervisor exits non-zero); else restart after a delay doubling with each recent death."""
    recent = sum(1 for t in deaths if now - t <= policy.window_s)
    if exit_code == CONFIG_ERROR:
        return GiveUp(recent, "config_error")
    if recent > policy.max_deaths:
        return GiveUp(recent)
    return Restart(min(policy.max_delay_s, policy.first_delay_s * 2 ** max(0, recent - 1)))


# ---------------------------------------------------------------------------- /proc reads (the edge)


def zombie_children(parent: int) -> list[int]:
    """Exited, unreaped children of ``parent`` (Linux ``/proc``)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state == "Z" and int(ppid) == parent:
            out.append(int(entry.name))
    return out


def usable_cpus() -> int:
    """:func:`cpu_budget` of this process (the I/O: affinity and ``/sys/fs/cgroup/cpu.max``)."""
    try:
        text: str | None = Path("/sys/fs/cgroup/cpu.max").read_text()
    except OSError:
        text = None
    return cpu_budget(len(os.sched_getaffinity(0)), cpu_quota(text))
