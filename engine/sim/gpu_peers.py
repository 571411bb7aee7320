"""Engines time-slicing one simulated GPU: how many of them are stepping now.

A fixed ``gpu_share`` charges every step the busy case: on a GPU four engines share, an engine
alone then runs at a quarter speed, so a router that puts all work on one engine (the SGLang
router did on the H200) crawls in simulation where the real GPU gave that engine all its time.
Engines of one simulated GPU instead share a folder: each keeps a marker file there while it has
steps to run, and each step's share comes from the number of markers (:func:`share_for`, pure).

A marker is created when an engine starts stepping and removed when it goes idle, so the folder
is touched twice per busy spell and listed once per step. An engine that dies busy leaves its
marker behind, and its peers count it until the folder goes: the benchmarks give each run a new
folder (the name holds the pid and a random part, so engines never share a marker).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from kvstack.common.config import read_config_file


def share_for(busy: int, share_by_busy: Sequence[float]) -> float:
    """A step's GPU share with ``busy`` engines stepping, this one included (at least 1): the
    table's entry for that count, its last entry past its end."""
    return share_by_busy[min(max(busy, 1), len(share_by_busy)) - 1]


class GpuPeers:
    """This engine's marker in the simulated GPU's folder, and the count of busy engines."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._marker = folder / f"{os.getpid()}-{secrets.token_hex(4)}.busy"
        self.busy = False

    def set_busy(self, busy: bool) -> None:
        """Mark this engine busy or idle (a no-op when it already is)."""
        if busy == self.busy:
            return
        self.busy = busy
        if busy:
            self._marker.touch()
        else:
            with contextlib.suppress(FileNotFoundError):
                self._marker.unlink()

    def count(self) -> int:
        """Engines marked busy now, this one included when it is."""
        with os.scandir(self.folder) as entries:
            return sum(1 for e in entries if e.name.endswith(".busy"))

    def close(self) -> None:
        self.set_busy(False)


# the device simulators launched together on one simulated GPU name in the router's engines file
SHARED_DEVICE = "sim-gpu-0"


def shares_gpu(config_file: Path | None) -> bool:
    """Whether simulators of this ``--config`` file share one simulated GPU when launched together:
    it has a ``shared_gpu.share_by_busy`` table."""
    if config_file is None:
        return False
    shared = read_config_file(config_file).get("shared_gpu")
    return isinstance(shared, dict) and bool(shared.get("share_by_busy"))


def shared_device(config_file: Path | None) -> str | None:
    """The device simulators of this ``--config`` file name for the router: :data:`SHARED_DEVICE`
    when they share one simulated GPU (:func:`shares_gpu`), else None (a GPU each)."""
    return SHARED_DEVICE if shares_gpu(config_file) else None


def peers_flags(config_file: Path | None, folder: Path) -> list[str]:
    """The ``kvstack engine sim`` flags that put simulators launched together on one simulated GPU,
    sharing ``folder``, when their ``--config`` file says they share one (:func:`shares_gpu`)."""
    return ["--gpu-peers-dir", str(folder)] if shares_gpu(config_file) else []
