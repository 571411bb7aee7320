"""A running router's CPU by thread: the event loop against the compiled relay's threads.

Follows the first ``kvstack router`` process that appears (start a ``kvstack bench gpu``
case beside it) until it exits, reading ``/proc/PID/task/*/stat`` every 50 ms, and prints the CPU
seconds of each thread name. A relay thread lives one stream and uses less than a clock tick, which
``/proc`` truncates to 0; the process total counts it in full, so what the live threads do not
account for at the end is the exited threads' CPU: the relay's, with nothing else exiting.

    .venv/bin/python scripts/measure_router_threads.py [--seconds 200]
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import time
from pathlib import Path

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def router_pid() -> int | None:
    found = subprocess.run(["pgrep", "-f", "kvstack route[r] "], capture_output=True, text=True)
    pids = found.stdout.split()
    return int(pids[0]) if pids else None


def cpu_ticks(stat: str) -> int:
    """utime + stime of one ``/proc/.../stat`` line (fields 14 and 15, after the command's ``)``)."""
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def follow(seconds: float) -> tuple[int, dict[str, int], collections.Counter[str]]:
    """(process ticks, ticks per thread name at their last reading, threads per name)."""
    deadline = time.monotonic() + seconds
    pid: int | None = None
    total = 0
    ticks: dict[str, int] = {}
    names: dict[str, str] = {}
    while time.monotonic() < deadline:
        pid = pid or router_pid()
        if pid is None:
            time.sleep(0.2)
            continue
        try:
            total = cpu_ticks(Path(f"/proc/{pid}/stat").read_text())
            for task in Path(f"/proc/{pid}/task").iterdir():
                tid = task.name
                try:
                    stat = (task / "stat").read_text()
                except FileNotFoundError:
                    continue  # the thread ended between the listing and the read
                names[tid] = stat[stat.index("(") + 1 : stat.rindex(")")]
                ticks[tid] = max(ticks.get(tid, 0), cpu_ticks(stat))
        except FileNotFoundError:
            break  # the router exited: the last readings stand
        time.sleep(0.05)
    by_name: dict[str, int] = collections.Counter()
    for tid, value in ticks.items():
        by_name[names[tid]] += value
    return total, by_name, collections.Counter(names.values())


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--seconds", type=float, default=200.0, help="give up after this long")
    args = parser.parse_args()
    total, by_name, threads = follow(args.seconds)
    seen = sum(by_name.values())
    print(f"process: {total * TICK_S:.2f} s of CPU")
    for name, value in sorted(by_name.items(), key=lambda kv: -kv[1]):
        print(f"  {name}: {value * TICK_S:.2f} s over {threads[name]} threads (their last reading)")
    print(f"  in no thread's reading (threads of under a tick, the relay's): {(total - seen) * TICK_S:.2f} s")


if __name__ == "__main__":
    main()
