"""A routing benchmark that is sent SIGTERM stops the engines and router it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvstack.common.waits import wait_until


def _children(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_sigterm_stops_the_stack(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "kvstack", "bench", "routing", "--out", str(tmp_path)]
    cmd += ["--workload", "long_doc_qa", "--regime", "pressured", "--policy", "round_robin"]
    cmd += ["--engines", "2", "--num-gpu-blocks", "2048"]
    bench = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kids: set[int] = set()
    try:

        def started() -> set[int] | None:
            found = _children(bench.pid)
            return found if len(found) >= 3 else None

        # the decision microbenchmark runs first: generous on a loaded machine
        kids = wait_until(started, "the 2 simulators and the router", timeout=180)
        bench.send_signal(signal.SIGTERM)
        bench.wait(timeout=30)
        wait_until(lambda: not [k for k in kids if _alive(k)], "every child to exit", timeout=15)
    finally:
        for k in kids:  # whatever the outcome, leave nothing running
            if _alive(k):
                os.kill(k, signal.SIGKILL)
        if bench.poll() is None:
            bench.kill()
            bench.wait()
