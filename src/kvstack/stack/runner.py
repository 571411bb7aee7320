"""Start the planned processes, wait until the router is ready, and stop them all on the way out.

Every child runs in its own process group (``kvstack.common.procs``) and is stopped group-wide on
Ctrl-C, SIGTERM, SIGHUP, a failed start, or the death of any child, so nothing is left running.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import yaml

from kvstack.common.procs import ManagedProcess, ProcessError, free_ports
from kvstack.stack.plan import EnginePorts, StackSettings, banner, engine_entries, plan_stack


class _Stop(Exception):
    """A signal asked the stack to stop."""


@contextmanager
def _signals_stop() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_stack(settings: StackSettings, run_dir: Path | None = None) -> int:
    """Run until a signal (exit 0) or a failure (exit 1)."""
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="kvstack-up-"))
    free = free_ports(3 * settings.engines)
    ports = [EnginePorts(*free[3 * i : 3 * i + 3]) for i in range(settings.engines)]
    engines_file = run_dir / "engines.yaml"
    engines_file.write_text(yaml.safe_dump(engine_entries(settings, ports), sort_keys=False))
    specs = plan_stack(settings, ports, engines_file)
    procs = [ManagedProcess(s.name, s.argv, run_dir, env=s.env, ready_url=s.ready_url) for s in specs]
    if settings.prometheus:
        procs.append(_prometheus(settings, ports, run_dir))
    started: list[ManagedProcess] = []
    say = print
    try:
        with _signals_stop():
            try:
                for proc in procs:
                    started.append(proc.start())
                say(f"kvstack up: starting {len(procs)} processes (logs in {run_dir})", flush=True)
                for proc in procs:
                    proc.wait_ready(settings.ready_timeout)
                say(banner(settings), flush=True)
                while True:
                    for proc in started:
                        if not proc.alive():
                            raise ProcessError(f"{proc.name} exited unexpectedly:\n{proc.tail()}")
                    time.sleep(0.5)
            except _Stop as stop:
                say(f"\nkvstack up: {stop}, stopping", flush=True)
                return 0
            except ProcessError as err:
                print(f"kvstack up: {err}", file=sys.stderr, flush=True)
                return 1
    finally:
        # signals are back to their defaults here; a second Ctrl-C must not skip the cleanup
        with _ignoring_signals():
            for proc in reversed(started):
                proc.stop()


def _prometheus(settings: StackSettings, ports: list[EnginePorts], run_dir: Path) -> ManagedProcess:
    """Prometheus scraping the router and every engine, with the labels and jobs the rules expect."""
    from kvstack.observability.prometheus import Target, prometheus_process

    targets = [
        Target("kvstack-engine", f"http://127.0.0.1:{p.http}", f"engine-{i}") for i, p in enumerate(ports)
    ]
    targets.append(Target("kvstack-router", f"http://127.0.0.1:{settings.port}", "router"))
    return prometheus_process(run_dir / "prometheus", targets, settings.prometheus_port)


@contextmanager
def _ignoring_signals() -> Iterator[None]:
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
