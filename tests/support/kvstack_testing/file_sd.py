"""Prometheus file_sd targets that follow the simulators behind Running pods.

For a Prometheus without Kubernetes discovery (Debian's): a thread rewrites the target file
whenever the set of running simulators changes, each labelled ``namespace`` and ``pod`` as a
PodMonitor would label it. Prometheus with Kubernetes discovery needs none of this
(:func:`kvstack.observability.prometheus.pod_sd_job`).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from kvstack.common.procs import ManagedProcess, free_port
from kvstack.observability.prometheus import Job, prometheus_process
from kvstack_testing.pod_sims import PodSimulators

ENGINE_JOB: Job = "kvstack-engine"  # the job the operator's engine queries select


def file_sd_prometheus(workdir: Path, targets: Path) -> ManagedProcess:
    """A Prometheus (not started) scraping ``targets``, a :class:`SimulatorTargets` file, every second
    as the engine job, without alert rules."""
    return prometheus_process(
        workdir, [], free_port(), rule_files=[], scrape_interval="1s", file_sd={ENGINE_JOB: targets}
    )


class SimulatorTargets:
    """Keeps ``path`` equal to ``sims``' running simulators (plus ``extra`` static groups)."""

    def __init__(self, sims: PodSimulators, path: Path, extra: list[dict[str, Any]] | None = None) -> None:
        self._sims, self.path, self._extra = sims, path, extra or []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._write([])

    def _write(self, groups: list[dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.path)  # atomic: Prometheus never reads half a file

    def _loop(self) -> None:
        last: list[dict[str, Any]] = []
        while not self._stop.wait(0.5):
            groups = [
                {"targets": [f"{t.host}:{t.port}"], "labels": {"namespace": t.namespace, "pod": t.name}}
                for t in sorted(self._sims.targets.values(), key=lambda t: t.name)
            ] + self._extra
            if groups != last:
                self._write(groups)
                last = groups

    def __enter__(self) -> SimulatorTargets:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
