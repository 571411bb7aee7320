import sys
from pathlib import Path

import pytest

from kvstack.common.procs import ManagedProcess, ProcessError, running
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
