"""``kvstack router --workers 2``: real processes on one port in front of real simulators.

Every request here opens its own connection (the kernel picks a worker per connection), and the
``x-kvstack-worker`` header (with ``expose_engine_header``) says which worker answered."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tests.conftest import free_port
from tests.router.conftest import KVSTACK, MODEL, Sim, run_event_sims

from kvstack.common.procs import ManagedProcess
from kvstack.common.waits import wait_until
from kvstack.router.workers import WORKER_HEADER

pytestmark = pytest.mark.slow

FAST = {
    "KVSTACK_ROUTER_EXPOSE_ENGINE_HEADER": "true",
    "KVSTACK_ROUTER_MONITOR__PROBE_INTERVAL": "0.2",
    "KVSTACK_ROUTER_MONITOR__SCRAPE_INTERVAL": "0.2",
}


@dataclass
class Workers:
    url: str
    proc: ManagedProcess

    def get(self, path: str) -> httpx.Response:
        """On a new connection: whichever worker the kernel picks."""
        return httpx.get(self.url + path, timeout=10)

    def chat(self, content: str, request_id: str | None = None, max_tokens: int = 4) -> httpx.Response:
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        headers = {"x-request-id": request_id} if request_id else {}
        return httpx.post(self.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)

    def ready_worker(self) -> str | None:
        """The pid of the worker that answered ``/ready`` with 200 on a new connection, if one did."""
        try:
            answer = self.get("/ready")
        except httpx.TransportError:  # no worker listening yet
            return None
        return answer.headers[WORKER_HEADER] if answer.status_code == 200 else None

    def pids(self, count: int) -> set[str]:
        """Wait until ``count`` distinct workers have answered ``/ready`` with 200; their pids."""
        seen: set[str] = set()

        def all_ready() -> bool:
            if (pid := self.ready_worker()) is not None:
                seen.add(pid)
            return len(seen) >= count

        wait_until(all_ready, f"{count} router workers ready", 60, 0.05)
        return seen

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        # the workers are still writing: what follows the last newline may be half a line (a read can
        # see a write that spans a page boundary in part), so only whole lines are parsed
        for line in self.proc.log_path.read_text(errors="replace").split("\n")[:-1]:
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines


@contextmanager
def run_workers(tmp: Path, *args: str, workers: int = 2, **env: str) -> Iterator[Workers]:
    port = free_port()
    argv = [KVSTACK, "router", "--port", str(port), "--workers", str(workers), *args]
    proc = ManagedProcess("router", argv, tmp, env={**FAST, **env})
    proc.start()
    try:
        yield Workers(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.stop(timeout=35)


def engine_args(sims: list[Sim]) -> list[str]:
    return [arg for sim in sims for arg in ("--engine", sim.url)]


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``, in one exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------------------- serving and metrics


def test_two_workers_serve_one_port_and_one_scrape_counts_both(sims: list[Sim], tmp_path: Path) -> None:
    with run_workers(tmp_path, *engine_args(sims)) as router:
        pids = router.pids(2)
        assert len(pids) == 2
        assert router.proc.pid not in {int(p) for p in pids}  # the supervisor serves nothing itself
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=3
        )
        assert answer.choices[0].message.content
        by_worker: Counter[str] = Counter({"openai": 1})

        def both_served() -> bool:
            response = router.chat(f"question {sum(by_worker.values())}")
            assert response.status_code == 200, response.text
            by_worker[response.headers[WORKER_HEADER]] += 1
            return all(by_worker[p] >= 3 for p in pids)

        wait_until(both_served, "requests answered by both workers", 60, 0.0)
        sent = sum(by_worker.values())

        def counted(text: str) -> tuple[float, float]:
            chats = metric_sum(text, "kvstack_router_route_requests_total", route="/v1/chat/completions")
            return metric_sum(text, "kvstack_router_requests_total"), chats

        # a request is counted as its answer ends: poll until the last one is in, one scrape at a time
        wait_until(
            lambda: counted(router.get("/metrics").text) == (sent, sent), "every request counted", 30, 0.05
        )
        text = router.get("/metrics").text
        assert counted(text) == (sent, sent)  # whichever worker answers the scrape
        assert 'kvstack_router_queued_requests{model_name="kvstack/sim-8b"} 0.0' in text  # livesum


def test_in_flight_load_is_shared_and_sigterm_drains(slow_sims: list[Sim], tmp_path: Path) -> None:
    """Streams opened one after another through both workers: each goes to the engine with fewer
    streams of the whole router (least_loaded on the shared table: two workers never pile onto one
    engine), any worker's scrape shows all of them in flight, and SIGTERM to the supervisor lets
    every one of them finish."""
    with run_workers(tmp_path, *engine_args(slow_sims)) as router:
        router.pids(2)
        results: list[tuple[str, int, str]] = []
        opened: list[str] = []
        engines: list[str] = []
        lock = threading.Lock()

        def stream(i: int) -> None:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"tell a long story {i}"}],
                "max_tokens": 200,  # ~10 s at a tenth of real time: every stream outlasts the opening
                "stream": True,
            }
            with httpx.stream("POST", router.url + "/v1/chat/completions", json=body, timeout=60) as r:
                with lock:
                    opened.append(r.headers.get(WORKER_HEADER, ""))
                    engines.append(r.headers.get("x-kvstack-engine", ""))
                text = "".join(r.iter_text())
            with lock:
                results.append((r.headers.get(WORKER_HEADER, ""), r.status_code, text))

        threads: list[threading.Thread] = []

        def both_workers_streaming() -> bool:
            with lock:
                workers = set(opened)
            if len(workers) >= 2 and len(opened) == len(threads) >= 6:
                return True
            if len(threads) < 16 and len(opened) == len(threads):  # the last one is in flight
                t = threading.Thread(target=stream, args=(len(threads),))
                t.start()
                threads.append(t)
            return False

        wait_until(both_workers_streaming, "streams open through both workers", 60, 0.02)
        in_flight = metric_sum(router.get("/metrics").text, "kvstack_router_engine_in_flight_requests")
        assert in_flight == len(threads)  # every worker's streams, from one worker's scrape
        per_engine = Counter(engines)
        assert len(per_engine) == 2 and max(per_engine.values()) - min(per_engine.values()) <= 1, engines
        os.kill(router.proc.pid, signal.SIGTERM)  # the supervisor only: it forwards to the workers
        for t in threads:
            t.join(60)
        assert router.proc.proc is not None
        assert router.proc.proc.wait(40) == 0
        assert len(results) == len(threads)
        for _, status, text in results:
            assert status == 200
            assert text.rstrip().endswith("data: [DONE]"), text[-200:]


# ---------------------------------------------------------------------------- restarts


def test_a_killed_worker_is_restarted(sims: list[Sim], tmp_path: Path) -> None:
    with run_workers(tmp_path, *engine_args(sims)) as router:
        pids = router.pids(2)
        victim = sorted(pids)[0]
        os.kill(int(victim), signal.SIGKILL)
        seen: set[str] = set()

        def replaced() -> bool:
            if (pid := router.ready_worker()) is not None:
                seen.add(pid)
            return len(seen - pids) >= 1 and len(seen & pids) >= 1

        wait_until(replaced, "a new worker beside the survivor", 60, 0.02)
        assert victim not in seen
        assert router.proc.alive()
        assert any(line.get("msg") == "router worker exited: restarting" for line in router.log_lines())


def test_workers_leave_with_a_killed_supervisor(sims: list[Sim], tmp_path: Path) -> None:
    with run_workers(tmp_path, *engine_args(sims)) as router:
        pids = [int(p) for p in router.pids(2)]
        os.kill(router.proc.pid, signal.SIGKILL)  # no chance to stop them

        def gone(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"

        wait_until(lambda: all(gone(p) for p in pids), "the orphaned workers to exit", 60, 0.1)


def test_supervisor_exits_1_when_workers_keep_dying(sims: list[Sim], tmp_path: Path) -> None:
    """Workers killed as fast as they come up: after the sixth death in a minute the supervisor
    stops (router/supervision.py's RestartPolicy) and exits 1."""
    with run_workers(tmp_path, *engine_args(sims)) as router:
        router.pids(2)
        killed: set[str] = set()

        def supervisor_gave_up() -> bool:
            if not router.proc.alive():
                return True
            pid = router.ready_worker()
            if pid is not None and pid not in killed:
                killed.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            return False

        wait_until(supervisor_gave_up, "the supervisor to give up", 120, 0.05)
        assert router.proc.proc is not None and router.proc.proc.returncode == 1
        assert len(killed) >= 6  # six deaths; one more may be killed while the last ones stop
        assert any(line.get("msg") == "router workers keep dying: stopping" for line in router.log_lines())


def test_a_configuration_the_workers_refuse_stops_the_supervisor_at_once(tmp_path: Path) -> None:
    # a policy that does not exist passes the settings' validation but fails each worker's start
    with run_workers(tmp_path, "--policy", "no-such-policy") as router:
        assert router.proc.proc is not None
        assert router.proc.proc.wait(120) == 2
        lines = router.log_lines()
        assert any("no-such-policy" in line.get("msg", "") for line in lines)
        assert any(line.get("msg") == "a router worker refused the configuration: stopping" for line in lines)
        assert sum(line.get("msg") == "router worker started" for line in lines) == 2  # never restarted


@pytest.mark.parametrize(
    ("given", "problem"), [("many", "valid integer"), ("-2", "greater than or equal to 0")]
)
def test_a_bad_worker_count_is_refused_naming_the_field(given: str, problem: str) -> None:
    out = subprocess.run([KVSTACK, "router", "--workers", given], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "invalid router configuration: workers:" in out.stderr and problem in out.stderr


def test_a_port_in_use_fails_the_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [KVSTACK, "router", "--port", str(port), "--workers", "2"]
        proc = ManagedProcess("router", argv, tmp_path).start()
        assert proc.proc is not None
        assert proc.proc.wait(60) == 3
        assert "cannot bind the router's port" in proc.tail()


# ---------------------------------------------------------------------------- KV events


@pytest.fixture
def event_sims(tmp_path: Path) -> Iterator[tuple[list[Sim], Path]]:
    with run_event_sims(tmp_path) as running:
        yield running


def test_kv_events_reach_every_worker(event_sims: tuple[list[Sim], Path], tmp_path: Path) -> None:
    """A prompt prefilled on engine-1 behind the router's back is known to both workers through
    the engine's KV events alone, and each routes it there as a cache hit."""
    sims, engines_file = event_sims
    args = ("--engines-file", str(engines_file), "--policy", "cache_aware", "--log-level", "debug")
    with run_workers(tmp_path, *args) as router:
        pids = router.pids(2)
        prompt = " ".join(f"word{i}" for i in range(400))
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1}
        assert httpx.post(sims[1].url + "/v1/chat/completions", json=body, timeout=30).status_code == 200

        def every_worker_indexed() -> bool:
            # any worker's scrape sums the blocks stored over both workers' indexes (router/metrics.py's
            # mirror): twice the blocks one index holds once both applied every event
            text = router.get("/metrics").text
            held = metric_sum(text, "kvstack_router_kv_index_blocks")
            return held > 0 and metric_sum(text, "kvstack_router_kv_index_blocks_stored_total") == 2 * held

        wait_until(every_worker_indexed, "both workers to apply engine-1's KV events", 60, 0.02)
        first: dict[str, str] = {}  # worker -> the request id of its first decision on the prompt

        def both_routed() -> bool:
            rid = f"kv-{len(first)}-{os.urandom(4).hex()}"
            answer = router.chat(prompt, request_id=rid, max_tokens=1)
            assert answer.status_code == 200, answer.text
            first.setdefault(answer.headers[WORKER_HEADER], rid)
            return set(first) >= pids

        wait_until(both_routed, "the prompt routed by both workers", 60, 0.0)
        decisions = {line["request_id"]: line for line in router.log_lines() if line.get("msg") == "decision"}
        for rid in first.values():
            decision = decisions[rid]
            assert decision["chosen"] == "engine-1" and decision["route_reason"] == "cache_hit", decision
            held = {e["engine"]: e["gpu_tokens"] for e in decision["engines"]}
            assert held["engine-1"] > 0 and held["engine-0"] == 0, decision
