"""``workers: N``: N router processes serving one port, under a supervisor that keeps them running.

Python serves one request at a time per process; a busy router is CPU-bound on one core. With
``workers`` above 1 the ``kvstack router`` process becomes a supervisor:

1. It reserves the API port (and ``metrics_port``) with a bound, non-listening ``SO_REUSEPORT``
   socket, so port 0 resolves once and nothing else takes the port while workers come and go.
2. It starts N worker processes (``spawn``: each a fresh interpreter). Each binds its own listening
   socket to the port with ``SO_REUSEPORT``; the kernel spreads new connections over them. Each
   worker is a whole router: its own discovery, health probes, scrapes, KV-event subscriptions
   (ZMQ PUB/SUB fans every event out to every subscriber, and replicas fed the same events and
   requests decide the same way), policy and flow control.
3. It owns the shared per-engine load (router/shared_load.py): the table file, and the slot map
   each worker asks over its pipe when discovery adds an engine; and the table of stored-response
   owners (router/shared_owners.py), so a follow-up reaching another worker finds its engine.
4. It gives the workers one metrics folder (``PROMETHEUS_MULTIPROC_DIR``), so any worker's
   ``/metrics`` answers for the whole router (router/metrics.py).
5. A worker that exits is restarted in the same row after a backoff, its row of the load table
   zeroed and its live gauges dropped; when workers keep dying (router/supervision.py) the
   supervisor stops the others and exits 1, so Kubernetes sees the crash loop; when one refused
   the configuration (a policy that does not exist), at once, with 2.
6. SIGTERM (or SIGINT) is forwarded to every worker, which drains as a single router does
   (stops accepting, finishes requests in flight, up to 30 s); the supervisor exits 0 once all
   have. A worker whose supervisor vanished (SIGKILL) drains and exits by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Final

import uvloop

from kvstack.router.config import RouterSettings
from kvstack.router.server import listen_sockets, reserve_ports
from kvstack.router.shared_load import LoadTable, SlotMap, answer
from kvstack.router.shared_owners import OwnersTable, table_cells
from kvstack.router.supervision import CONFIG_ERROR, GiveUp, RestartPolicy, after_death, zombie_children

if TYPE_CHECKING:
    from kvstack.router.metrics import RouterMetrics

log = logging.getLogger(__name__)

WORKER_HEADER: Final = "x-kvstack-worker"  # the worker's pid, with expose_engine_header (debugging)
STARTUP_FAILURE: Final = 3  # uvicorn's exit code when it cannot bind
MIRROR_INTERVAL_S: Final = 1.0  # how stale another worker's scrape-time series may be in a scrape


# ---------------------------------------------------------------------------- the worker process


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process is started with (pickled into it)."""

    settings: RouterSettings  # its port is the reserved one (never 0)
    index: int
    workers: int
    table: Path
    owners: Path  # the stored-response owners every worker shares (router/shared_owners.py)
    owner_cells: int
    supervisor_pid: int


def _worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """One worker: a whole router, sharing its engines' load through the table."""
    from kvstack.common.config import ConfigError
    from kvstack.router.app import create_app
    from kvstack.router.engines import EngineRegistry
    from kvstack.router.gc_tuning import tune_gc
    from kvstack.router.logs import configure_logging
    from kvstack.router.server import make_server
    from kvstack.router.shared_load import SharedLoad, SlotClient
    from kvstack.router.shared_owners import OwnersTable, SharedOwners

    settings = spec.settings
    configure_logging(settings.log_level)
    _exit_with_supervisor(spec.supervisor_pid)
    registry = EngineRegistry()
    table = LoadTable(spec.table, spec.workers)
    shared = SharedLoad(registry, table, spec.index, SlotClient(conn))
    shared.start()
    try:
        app = create_app(settings, registry)
    except ConfigError as err:  # a bad policy or key file: every worker would refuse it
        log.error(str(err))
        sys.exit(CONFIG_ERROR)
    ctx = app.app.state.ctx
    owners = OwnersTable(spec.owners, spec.owner_cells)
    ctx.owners = SharedOwners(settings.sticky_responses, owners, shared.slot_of, shared.url_of)
    tune_gc(settings.gc_gen0_threshold)
    headers = [(WORKER_HEADER, str(os.getpid()))] if settings.expose_engine_header else []
    server = make_server(settings, app, ctx.metrics.reject, headers=headers)
    sockets = listen_sockets(settings, reuse_port=True)

    async def serve() -> None:
        mirror = asyncio.create_task(_mirror_metrics(ctx.metrics))
        try:
            await server.serve(sockets=sockets)
        finally:
            mirror.cancel()

    try:
        uvloop.run(serve())
    finally:
        shared.close()
        owners.close()


async def _mirror_metrics(metrics: RouterMetrics) -> None:
    """This worker's scrape-time series into the shared metrics folder, every second, so a scrape
    answered by another worker reports them (router/metrics.py)."""
    while True:
        metrics.mirror()
        await asyncio.sleep(MIRROR_INTERVAL_S)


def _exit_with_supervisor(supervisor_pid: int) -> None:
    """Drain and exit when the supervisor is gone (killed without a chance to stop the workers)."""

    def watch() -> None:
        while os.getppid() == supervisor_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's handler: the same drain as a SIGTERM

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


# ---------------------------------------------------------------------------- the supervisor


@dataclass
class _Worker:
    index: int
    process: BaseProcess | None = None
    conn: Connection | None = None
    restart_at: float | None = None  # when a dead worker is due to start again


@dataclass
class _Run:
    """What one run of the supervisor made and the workers share: removed with it."""

    folder: Path
    settings: RouterSettings  # the workers': the port resolved
    table: LoadTable
    owners: OwnersTable
    slots: SlotMap = field(default_factory=SlotMap)

    @classmethod
    def create(cls, settings: RouterSettings, workers: int) -> _Run:
        folder = Path(tempfile.mkdtemp(prefix="kvstack-router-", dir=_tmpfs()))
        (folder / "metrics").mkdir()
        cells = table_cells(settings.sticky_responses.max_entries)
        return cls(
            folder,
            settings,
            LoadTable.create(folder / "load.table", workers),
            OwnersTable.create(folder / "owners.table", cells),
        )

    def spec(self, index: int, workers: int) -> WorkerSpec:
        return WorkerSpec(
            self.settings, index, workers, self.table.path, self.owners.path, self.owners.cells, os.getpid()
        )

    def close(self) -> None:
        self.table.close()
        self.owners.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class Supervisor:
    """Starts, watches and restarts the workers; forwards SIGTERM; see the module's docstring."""

    def __init__(self, settings: RouterSettings, count: int, policy: RestartPolicy | None = None) -> None:
        self.settings, self.count = settings, count
        self.policy = policy or RestartPolicy()
        self._workers = [_Worker(i) for i in range(count)]
        self._deaths: list[float] = []
        self._stopping = False
        self._exit_code = 0
        self._spawn = multiprocessing.get_context("spawn")

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (0), until workers keep dying (1), or not at all when the port
        cannot be bound (3)."""
        try:
            reserved = reserve_ports(self.settings)
        except OSError as err:  # as uvicorn's own bind failure: a line, and its startup-failure code
            log.error("cannot bind the router's port", extra={"host": self.settings.host, "error": str(err)})
            return STARTUP_FAILURE
        port = reserved[0].getsockname()[1]
        run = _Run.create(self.settings.model_copy(update={"port": port}), self.count)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(run.folder / "metrics")  # inherited by each worker
        wake_r, wake_w = socket.socketpair()
        wake_w.setblocking(False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, _wake_only)  # the loop reaps orphans
        old_fd = signal.set_wakeup_fd(wake_w.fileno())
        log.info("router supervisor started", extra={"workers": self.count, "port": port})
        try:
            for worker in self._workers:
                self._start(run, worker)
            self._loop(run, wake_r)
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for sock in (*reserved, wake_r, wake_w):
                sock.close()
            run.close()
        return self._exit_code

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stopping = True  # the loop wakes on the wakeup fd and forwards it

    def _start(self, run: _Run, w: _Worker) -> None:
        ours, theirs = self._spawn.Pipe()
        process = self._spawn.Process(
            target=_worker_main, args=(run.spec(w.index, self.count), theirs), name=f"router-worker-{w.index}"
        )
        process.start()
        theirs.close()
        w.process, w.conn, w.restart_at = process, ours, None
        log.info("router worker started", extra={"worker": w.index, "pid": process.pid})

    def _loop(self, run: _Run, wake: socket.socket) -> None:
        forwarded = False
        while True:
            if self._stopping and not forwarded:
                forwarded = True
                self._signal_all(signal.SIGTERM)
            running = [w for w in self._workers if w.process is not None]
            if self._stopping and not running:
                return
            due = [w.restart_at for w in self._workers if w.restart_at is not None and not self._stopping]
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            watched: list[object] = [wake]
            for w in running:
                assert w.process is not None and w.conn is not None
                watched += [w.process.sentinel, w.conn]
            for ready in wait(watched, timeout):  # type: ignore[arg-type]
                if ready is wake:
                    with contextlib.suppress(BlockingIOError):
                        wake.recv(4096)
                    self._reap_orphans()
                    continue
                for w in running:
                    if ready is w.conn:
                        self._answer(run, w)
                    elif w.process is not None and ready == w.process.sentinel:
                        self._died(run, w)
            now = time.monotonic()
            for w in self._workers:
                if w.restart_at is not None and now >= w.restart_at and not self._stopping:
                    self._start(run, w)

    def _reap_orphans(self) -> None:
        """In a container the supervisor is PID 1: a dead worker's own children (its tokenizer
        process) become ours when they exit, and would stay zombies. Workers are joined apart."""
        known = {w.process.pid for w in self._workers if w.process is not None}
        for pid in zombie_children(os.getpid()):
            if pid not in known:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)

    def _answer(self, run: _Run, w: _Worker) -> None:
        """One slot-map request of a worker (router/shared_load.py)."""
        assert w.conn is not None
        try:
            op, url = w.conn.recv()
            w.conn.send(answer(run.slots, run.table, w.index, op, url))
        except (EOFError, OSError):
            pass  # the worker is exiting; its sentinel says so next

    def _died(self, run: _Run, w: _Worker) -> None:
        from prometheus_client import multiprocess

        assert w.process is not None and w.conn is not None
        w.process.join()
        pid, code = w.process.pid, w.process.exitcode
        w.conn.close()
        w.process, w.conn = None, None
        # its requests died with it: nothing of them may count as load any more
        run.table.clear_row(w.index)
        run.slots.release_worker(w.index)
        if pid is not None:
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]  # its live gauges go too
        if self._stopping:
            log.info("router worker stopped", extra={"worker": w.index, "pid": pid, "exit_code": code})
            return
        now = time.monotonic()
        self._deaths = [*self._deaths, now][-(self.policy.max_deaths + 1) :]
        outcome = after_death(self._deaths, now, self.policy, code)
        if isinstance(outcome, GiveUp):
            message = {
                "crash_loop": "router workers keep dying: stopping",
                "config_error": "a router worker refused the configuration: stopping",
            }[outcome.reason]
            log.error(message, extra={"worker": w.index, "exit_code": code, "deaths": outcome.deaths})
            self._exit_code, self._stopping = outcome.exit_code, True
            return
        log.warning(
            "router worker exited: restarting",
            extra={"worker": w.index, "pid": pid, "exit_code": code, "delay_s": outcome.delay_s},
        )
        w.restart_at = now + outcome.delay_s

    def _signal_all(self, sig: signal.Signals) -> None:
        for w in self._workers:
            w.restart_at = None
            if w.process is not None and w.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.process.pid, sig)


def _wake_only(signum: int, frame: object) -> None:
    """A handler, so the signal reaches the wakeup fd; the loop does the work."""


def _tmpfs() -> str | None:
    """/dev/shm when there is one: the load table and metric files are written per request."""
    return "/dev/shm" if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None
