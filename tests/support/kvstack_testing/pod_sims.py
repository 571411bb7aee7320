"""One ``kvstack engine sim`` process per Running pod, listening on the pod's own (loopback) IP.

kwok gives pods IPs inside 127.0.0.0/8, which Linux routes to ``lo``, so a simulator bound to a
pod's IP and container port makes the pod answer exactly where the router's Kubernetes discovery
and Prometheus' pod service discovery will look for it.

kwok marks a pod Ready the moment it runs, before its simulator listens, where a kubelet would wait
for the readiness probe. With ``ready_label``, the harness plays that probe: it labels the pod
``<ready_label>=true`` once its simulator answers ``/health``, and a client that must not see an
engine before it serves (the router) selects on that label as well.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from kvstack.common.kube import Credentials, KubeClient, KubeError, Listed, reflect, resource_path
from kvstack.common.kube.blocking import BlockingKube
from kvstack.common.waits import wait_until
from kvstack_testing.pod_targets import DEFAULT_PORT_NAME, Pod, SimTarget, apply_event, desired_targets, plan

log = logging.getLogger(__name__)

Command = Callable[[SimTarget], Sequence[str]]


def kvstack_executable() -> str:
    """The ``kvstack`` script of this interpreter's environment (falls back to PATH)."""
    beside = Path(sys.executable).with_name("kvstack")
    found = str(beside) if beside.exists() else shutil.which("kvstack")
    if not found:
        raise RuntimeError("the kvstack command is not installed in this environment")
    return found


def sim_command(target: SimTarget) -> list[str]:
    """``kvstack engine sim`` for one pod, plus the pod's ``sim.kvstack.io/args``."""
    return [
        kvstack_executable(),
        *("engine", "sim", "--host", target.host, "--port", str(target.port), "--model", target.model),
        *target.extra_args,
    ]


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds; reap the leader."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            # The leader is gone; children that ignored SIGTERM still share its group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue


class _SimProcess:
    """A running simulator and the log file it writes to."""

    def __init__(self, target: SimTarget, argv: Sequence[str], log_dir: Path) -> None:
        self.target = target
        self.log_path = log_dir / f"{target.namespace}_{target.name}_{target.uid[:8]}.log"
        self._log: IO[bytes] = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def stop(self) -> None:
        stop_process_group(self.proc)
        self._log.close()


def _healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:
            return int(resp.status) == 200
    except (OSError, urllib.error.URLError):
        return False


class PodSimulators:
    """Watches pods matching ``label_selector`` and keeps one simulator per Running pod.

    Use as a context manager, or ``start()`` / ``stop()``. ``namespace=None`` watches every namespace.
    """

    def __init__(
        self,
        credentials: Credentials,
        label_selector: str = "app.kubernetes.io/component=engine",
        *,
        namespace: str | None = None,
        port_name: str = DEFAULT_PORT_NAME,
        command: Command = sim_command,
        log_dir: Path | None = None,
        ready_label: str | None = None,
    ) -> None:
        self.credentials = credentials
        self.label_selector = label_selector
        self.namespace = namespace
        self.port_name = port_name
        self._command = command
        self._owns_log_dir = log_dir is None
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="kvstack-podsims-"))
        self._pods: dict[str, Pod] = {}
        self._sims: dict[str, _SimProcess] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready_label = ready_label
        self._labelled: set[str] = set()  # pod uids that carry the ready label
        self._prober: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the watch thread's, while it runs
        self._watch_task: asyncio.Task[None] | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> PodSimulators:
        if self._thread is None:
            atexit.register(self.stop)  # simulators run in their own sessions: never leave them behind
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._stopping.clear()
            self._thread = threading.Thread(target=self._watch_loop, name="pod-sims", daemon=True)
            self._thread.start()
            if self.ready_label is not None:
                self._prober = threading.Thread(target=self._probe_loop, name="pod-sims-ready", daemon=True)
                self._prober.start()
        return self

    def stop(self) -> None:
        """Stop watching, then stop every simulator. Idempotent."""
        atexit.unregister(self.stop)
        self._stopping.set()
        loop, task = self._loop, self._watch_task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # the loop may have ended already
                loop.call_soon_threadsafe(task.cancel)
        for thread in (self._thread, self._prober):
            if thread is not None:
                thread.join(timeout=15)
        self._thread = self._prober = None
        with self._lock:
            sims, self._sims = list(self._sims.values()), {}
        for sim in sims:
            sim.stop()
        if self._owns_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> PodSimulators:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- what tests look at ----------------------------------------------------------------------
    @property
    def targets(self) -> dict[str, SimTarget]:
        """The simulators running now, by pod uid."""
        with self._lock:
            return {uid: sim.target for uid, sim in self._sims.items() if sim.proc.poll() is None}

    @property
    def pids(self) -> dict[str, int]:
        """Process ids of the simulators running now, by pod uid (each leads its own process group)."""
        with self._lock:
            return {uid: sim.proc.pid for uid, sim in self._sims.items() if sim.proc.poll() is None}

    def wait_for(self, count: int, timeout: float = 60.0) -> list[SimTarget]:
        """Block until exactly ``count`` simulators run and answer ``/health``; returns them."""

        def ready() -> tuple[list[SimTarget]] | None:  # a tuple: zero simulators is an answer too
            targets = list(self.targets.values())
            if len(targets) == count and all(_healthy(t.url) for t in targets):
                return (sorted(targets, key=lambda t: (t.namespace, t.name)),)
            return None

        try:
            (found,) = wait_until(ready, f"{count} healthy simulators", timeout, interval=0.2)
        except AssertionError as exc:
            running = [t.url for t in self.targets.values()]
            raise TimeoutError(f"{exc}: running {running}\n{self._log_tails()}") from None
        return list(found)

    def _log_tails(self, lines: int = 5) -> str:
        """The last lines of every simulator log, for error messages (the logs go with ``stop()``)."""
        tails = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(tails)

    # ---- readiness -------------------------------------------------------------------------------
    def _probe_loop(self) -> None:
        """Label each pod whose simulator answers ``/health``, as a kubelet would mark it Ready."""
        with BlockingKube(self.credentials) as kube:
            self._probe_with(kube)

    def _probe_with(self, kube: BlockingKube) -> None:
        while not self._stopping.wait(0.2):
            targets = self.targets
            self._labelled &= set(targets)
            for uid, target in targets.items():
                if uid not in self._labelled and _healthy(target.url, timeout=0.5):
                    try:
                        self._mark_ready(kube, target)
                    except Exception as err:  # the pod may be going; the next round tries again
                        log.warning("cannot label pod %s/%s ready: %s", target.namespace, target.name, err)
                        continue
                    self._labelled.add(uid)

    def _mark_ready(self, kube: BlockingKube, target: SimTarget) -> None:
        assert self.ready_label is not None
        patch = {"metadata": {"labels": {self.ready_label: "true"}}}
        try:
            kube.merge_patch(resource_path("v1", "pods", target.namespace, target.name), patch)
        except KubeError as err:
            if err.status != 404:  # a pod already gone needs no label
                raise

    # ---- watching --------------------------------------------------------------------------------
    def _watch_loop(self) -> None:
        """The watch thread: its own event loop, until ``stop()`` cancels the watch."""
        loop = asyncio.new_event_loop()
        try:
            self._loop = loop
            self._watch_task = task = loop.create_task(self._follow())
            if self._stopping.is_set():  # stop() came before the task existed
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(task)
        finally:
            self._loop = self._watch_task = None
            loop.close()

    async def _follow(self) -> None:
        """List and watch the pods (resumed and re-listed by the shared client), re-listing on failure."""
        path = resource_path("v1", "pods", self.namespace)
        resync = asyncio.create_task(self._resync())
        try:
            while not self._stopping.is_set():
                try:
                    async with KubeClient(self.credentials) as kube:
                        async for item in reflect(
                            kube, path, label_selector=self.label_selector, timeout_s=60
                        ):
                            if isinstance(item, Listed):
                                self._pods = {p["metadata"]["uid"]: p for p in item.items}
                            else:
                                self._pods = apply_event(self._pods, item.type, item.object)
                            self._reconcile()
                except Exception as err:  # the API may be restarting; re-list after a short pause
                    log.warning("pod watch failed (%r); re-listing", err)
                    await asyncio.sleep(0.5)
        finally:
            resync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await resync  # done before the loop closes

    async def _resync(self) -> None:
        """Every few seconds: restart simulators that exited, as a kubelet restarts containers."""
        while True:
            await asyncio.sleep(2)
            self._reconcile()  # on the watch's own thread: never concurrent with the watch's calls

    def _reconcile(self) -> None:
        desired = desired_targets(self._pods, self.port_name)
        with self._lock:
            running = {uid: sim.target for uid, sim in self._sims.items() if sim.proc.poll() is None}
            to_start, to_stop = plan(running, desired)
            # A simulator that exited on its own is restarted, as a kubelet would restart a container.
            stopping = [(uid, sim) for uid, sim in self._sims.items() if uid in to_stop or uid not in running]
        for uid, sim in stopping:
            log.info("stopping simulator for pod %s/%s", sim.target.namespace, sim.target.name)
            sim.stop()  # still listed until it is down, so wait_for() never sees a half-stopped pod
            with self._lock:
                if self._sims.get(uid) is sim:
                    del self._sims[uid]
        for target in to_start:
            if self._stopping.is_set():
                return
            log.info("starting simulator for pod %s/%s at %s", target.namespace, target.name, target.url)
            sim = _SimProcess(target, self._command(target), self.log_dir)
            with self._lock:
                self._sims[target.uid] = sim
