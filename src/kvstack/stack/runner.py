"""Start the planned processes, wait until the router is ready, and stop them all on the way out.

Every child runs in its own process group (``kvstack.common.procs``) and is stopped group-wide on
Ctrl-C, SIGTERM, SIGHUP, a failed start, or the death of any child, so nothing is left running.
What would certainly fail (a program not installed, a port in use) is found before anything starts
and reported in one line each, exit status 2.
"""

from __future__ import annotations

import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import yaml

from kvstack.common.procs import ManagedProcess, ProcessError, free_ports
from kvstack.stack.plan import (
    EnginePorts,
    ProcessSpec,
    StackSettings,
    banner,
    engine_entries,
    plan_stack,
    preflight,
)

PREFLIGHT_FAILED = 2


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
    """Run until a signal (exit 0), a failure (exit 1), or a preflight problem (exit 2)."""
    free = free_ports(3 * settings.engines + 1)
    ports = [EnginePorts(*free[3 * i : 3 * i + 3]) for i in range(settings.engines)]
    redis_port = free[-1] if settings.lmcache else None
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="kvstack-up-"))
    engines_file = run_dir / "engines.yaml"
    specs = plan_stack(settings, ports, engines_file, redis_port)
    procs = [_process(s, run_dir) for s in specs]
    if settings.prometheus:
        procs.append(_prometheus(settings, ports, run_dir))
    problems = preflight(settings, [p.argv[0] for p in procs], shutil.which, _port_free)
    if problems:
        for problem in problems:
            print(f"kvstack up: {problem}", file=sys.stderr, flush=True)
        return PREFLIGHT_FAILED
    engines_file.write_text(yaml.safe_dump(engine_entries(settings, ports), sort_keys=False))
    readiness = {s.name: s.ready_redis_port for s in specs if s.ready_redis_port is not None}
    started: list[ManagedProcess] = []
    say = print
    try:
        with _signals_stop():
            try:
                say(f"kvstack up: starting {len(procs)} processes (logs in {run_dir})", flush=True)
                for proc in procs:
                    started.append(proc.start())
                    if proc.name in readiness:  # the engines' shared tier answers before they start
                        _wait_redis(proc, readiness[proc.name], settings.ready_timeout)
                for proc in procs:
                    proc.wait_ready(settings.ready_timeout)
                say(banner(settings, ports, redis_port), flush=True)
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


def _process(spec: ProcessSpec, run_dir: Path) -> ManagedProcess:
    return ManagedProcess(spec.name, spec.argv, run_dir, env=spec.env, ready_url=spec.ready_url)


def _port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now (as the router or Prometheus will bind it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _redis_pongs(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _wait_redis(proc: ManagedProcess, port: int, timeout: float) -> None:
    """Poll Redis with PING until it answers; fail early if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ProcessError(f"{proc.name} exited on start:\n{proc.tail()}")
        if _redis_pongs(port):
            return
        time.sleep(0.05)
    raise ProcessError(f"{proc.name} did not answer PING on port {port} after {timeout:.0f}s")


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
