import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstack.common.procs import ManagedProcess, ProcessError, exit_on_sigterm, running
from kvstack.common.waits import wait_until


def _http_server(tmp_path: Path, port: int) -> ManagedProcess:
    return ManagedProcess(
        "http",
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        tmp_path,
        ready_url=f"http://127.0.0.1:{port}/",
    )


def test_running_starts_waits_and_stops(tmp_path: Path, unused_port: int) -> None:
    with running([_http_server(tmp_path, unused_port)]) as (proc,):
        assert proc.alive()
    assert not proc.alive()


def test_child_that_exits_fails_fast_with_its_log(tmp_path: Path) -> None:
    bad = ManagedProcess(
        "bad",
        [sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
        tmp_path,
        ready_url="http://127.0.0.1:9/",
    )
    with pytest.raises(ProcessError, match="boom"), running([bad], timeout=10):
        pass
    assert not bad.alive()


def test_stop_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
    proc = ManagedProcess("stubborn", [sys.executable, "-c", code + "time.sleep(60)"], tmp_path).start()
    wait_until(lambda: "up" in proc.tail(), "the SIGTERM handler", timeout=10, interval=0.02)
    proc.stop(timeout=0.5)
    assert not proc.alive()


@pytest.fixture
def sigterm_exits() -> Iterator[None]:
    """``exit_on_sigterm`` for one test; the previous handler back afterwards."""
    previous = signal.getsignal(signal.SIGTERM)
    exit_on_sigterm()
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_while_a_child_is_forked_still_stops_that_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sigterm_exits: None
) -> None:
    """SIGTERM delivered right after the fork, before the ``Popen`` is recorded: the child is recorded
    anyway, the exit comes after, and ``running`` stops it. Before the hold, the SystemExit left the
    child running in its own session (a routing benchmark stopped as its router was forked)."""
    real_popen = subprocess.Popen
    forked: list[subprocess.Popen[bytes]] = []

    def popen_then_sigterm(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        child = real_popen(*args, **kwargs)
        forked.append(child)
        os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode, still inside start()
        return child

    monkeypatch.setattr(subprocess, "Popen", popen_then_sigterm)
    sleeper = ManagedProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path)
    with pytest.raises(SystemExit) as exited, running([sleeper]):
        pytest.fail("SIGTERM must end the start")  # never reached: start() exits
    assert exited.value.code == 143
    (child,) = forked
    assert sleeper.proc is child
    assert child.poll() is not None  # stopped by running(), not left behind


def test_sigterm_outside_a_start_exits_at_once(sigterm_exits: None) -> None:
    with pytest.raises(SystemExit) as exited:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs at a bytecode boundary
            pass
    assert exited.value.code == 143
