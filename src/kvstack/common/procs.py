"""Child processes that are started, waited for and always stopped: engines, routers, Prometheus.

Each child runs in its own process group so that stopping it also stops anything it spawned, and
its output goes to a log file (reading a pipe nobody drains would eventually block the child).

A command that should stop its children when sent SIGTERM calls :func:`exit_on_sigterm`: SIGTERM
then raises ``SystemExit`` as Ctrl-C raises ``KeyboardInterrupt``, and :func:`running` stops what
it started. Not while a child is being started: a signal handled between the fork and the moment
its ``Popen`` is recorded would leave that child running with nobody to stop it (its own session
outlives the command), so SIGTERM is held until the child is recorded (a routing benchmark stopped
as its router was forked left the router behind, session 26's CI).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that are free now, chosen by the kernel.

    All sockets stay bound while choosing, so the ports are distinct; they are released on return,
    so a child can bind them (a small race with other programs remains, as with any such choice).
    """
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def free_port() -> int:
    """One free loopback port (see :func:`free_ports`)."""
    return free_ports(1)[0]


SIGTERM_EXIT = 143  # 128 + SIGTERM, as a shell reports a process it ended


class _SigtermHold:
    """Whether a child is being started (``depth``) and a SIGTERM came meanwhile (``pending``)."""

    depth = 0
    pending = False


@contextlib.contextmanager
def _sigterm_held() -> Iterator[None]:
    """Run the block whole even if SIGTERM comes (with :func:`exit_on_sigterm`); exit after it.
    Only the main thread's blocks: the handler runs there, and its exit must end the process there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _SigtermHold.depth += 1
    try:
        yield
    finally:
        _SigtermHold.depth -= 1
        if _SigtermHold.depth == 0 and _SigtermHold.pending:
            # the exit asked for, even over an error of the block's own (a start that failed)
            _SigtermHold.pending = False
            raise SystemExit(SIGTERM_EXIT)


def _on_sigterm(_signum: int, _frame: object) -> None:
    if _SigtermHold.depth:
        _SigtermHold.pending = True
        return
    raise SystemExit(SIGTERM_EXIT)


def exit_on_sigterm() -> None:
    """From now on SIGTERM ends this process like Ctrl-C (``SystemExit(143)``), so that
    :func:`running` stops the children it started, which live in their own sessions and would
    outlive it; held while a child is being started. Only the main thread can set a handler."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


class ProcessError(RuntimeError):
    """A child failed to start or to become ready; the message ends with its last log lines."""


class ManagedProcess:
    """One child process with a name, a log file and a readiness URL."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        ready_url: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = {**os.environ, **(env or {})}
        self.ready_url = ready_url
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log, _sigterm_held():
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ProcessError(f"{self.name} was never started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll ``ready_url`` until it answers 200; fail early if the child exits."""
        if self.ready_url is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ProcessError(
                    f"{self.name} exited with {self.proc and self.proc.returncode}:\n{self.tail()}"
                )
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(self.ready_url, timeout=1.0) as resp,
            ):
                if resp.status == 200:
                    return
            time.sleep(0.05)
        raise ProcessError(f"{self.name} not ready at {self.ready_url} after {timeout:.0f}s:\n{self.tail()}")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


@contextlib.contextmanager
def running(procs: Sequence[ManagedProcess], timeout: float = 30.0) -> Iterator[list[ManagedProcess]]:
    """Start all, wait until each is ready, and stop all on exit (in reverse order), errors or not."""
    started: list[ManagedProcess] = []
    try:
        for p in procs:
            started.append(p)  # before it starts: stop() of one never started is a no-op
            p.start()
        for p in started:
            p.wait_ready(timeout)
        yield started
    finally:
        for p in reversed(started):
            p.stop()


def kvstack_argv(*args: str) -> list[str]:
    """Run this environment's ``kvstack`` (the script beside the interpreter; else ``python -m kvstack``)."""
    beside = Path(sys.executable).with_name("kvstack")
    return [str(beside), *args] if beside.exists() else [sys.executable, "-m", "kvstack", *args]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux ``/proc/PID/task/*/children``)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its live descendants (a supervisor's workers, or a launcher that
    runs the real work in a child); processes that end meanwhile are skipped."""
    total = 0.0
    for p in descendants(pid):
        try:
            total += cpu_seconds(p)
        except OSError:
            continue
    return total


def tree_memory_mb(pid: int) -> float:
    """RSS of a process and its live descendants, in MiB (shared pages counted in each)."""
    total = 0.0
    for p in descendants(pid):
        try:
            total += memory_mb(p)
        except OSError:
            continue
    return total


def memory_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory field of ``/proc/PID/status`` in MiB: ``VmRSS`` now, ``VmHWM`` its peak; 0 if absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0
