"""What the real-cluster autoscaling benchmark runs beside the stack: load and a recorder.

* :class:`OpenLoopLoad` sends streamed completions through the router at the planned rate (Poisson
  arrivals from a fixed seed), whatever the fleet does, and notes which pod answered each one;
* :class:`Recorder` samples the Deployment, the pods and Prometheus every half second.

Prometheus finds the simulators through :class:`kvstack_testing.SimulatorTargets` (file_sd).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import string
import threading
import time
from typing import Any

import httpx

from kvstack.bench.autoscale_plan import MODEL, Phases, PodShape, Request, Sample, with_serving
from kvstack.common.kube import resource_path
from kvstack.common.kube.blocking import BlockingKube

ENGINE_HEADER = "x-kvstack-engine"


def prompt(rng: random.Random, tokens: int) -> str:
    """``tokens`` built-in-tokenizer tokens (one per `` xyz`` piece), different every call, so no
    request hits another's prefix cache."""
    return "".join(" " + "".join(rng.choices(string.ascii_lowercase, k=3)) for _ in range(tokens))


def arrivals(phases: Phases, seed: int = 6) -> list[float]:
    """Send times (seconds since the step) of a Poisson process at the phases' rates."""
    rng = random.Random(seed)
    times: list[float] = []
    t = -phases.warm_s
    while True:
        t += rng.expovariate(phases.rate(t))
        if t >= phases.end_s:
            return times
        times.append(t)


class OpenLoopLoad:
    """Streamed completions through the router on a schedule, in a thread with its own event loop."""

    def __init__(self, base_url: str, phases: Phases, pod: PodShape, step_at: float, seed: int = 6) -> None:
        self.base_url = base_url.rstrip("/")
        self.phases, self.pod, self.step_at = phases, pod, step_at
        self._schedule = arrivals(phases, seed)
        self._rng = random.Random(seed + 1)
        self.requests: list[Request] = []
        self.served: dict[str, float] = {}  # pod name -> first time a request it answered succeeded
        self.in_flight = 0
        self.errors: dict[str, int] = {}
        self.unfinished = 0  # still running when the run ended (cancelled; neither ok nor an error)
        self._stop = threading.Event()
        self._grace_s = 20.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def now(self) -> float:
        return time.monotonic() - self.step_at

    def start(self) -> OpenLoopLoad:
        self._thread.start()
        return self

    def stop(self, grace_s: float = 20.0) -> None:
        """No new requests; wait up to ``grace_s`` for the ones in flight, then cancel them."""
        self._grace_s = grace_s
        self._stop.set()
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stopped.set)
        self._thread.join(timeout=grace_s + 10)

    async def _until_stopped(self, wait_s: float | None) -> bool:
        """Wait for ``stop()`` at most ``wait_s`` seconds (None: for ever); whether it came."""
        assert self._stopped is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), wait_s)
        return self._stopped.is_set()

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if self._stop.is_set():  # stop() came before the loop existed
            return
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=5), limits=limits) as client:
            tasks: set[asyncio.Task[None]] = set()
            for when in self._schedule:
                if await self._until_stopped(max(0.0, when - self.now())):
                    break
                task = asyncio.create_task(self._one(client, when))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await self._until_stopped(None)  # the schedule ended: the last requests finish meanwhile
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=self._grace_s)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)

    async def _one(self, client: httpx.AsyncClient, sent: float) -> None:
        body = {
            "model": MODEL,
            "prompt": prompt(self._rng, self.pod.prompt_tokens),
            "max_tokens": self.pod.max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        first: float | None = None
        engine, ok, error = "", False, ""
        self.in_flight += 1
        try:
            async with client.stream("POST", f"{self.base_url}/v1/completions", json=body) as resp:
                engine = resp.headers.get(ENGINE_HEADER, "")
                if resp.status_code != 200:
                    error = f"HTTP {resp.status_code}"
                else:
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            ok = True
                            break
                        if first is None:
                            first = self.now()
                        if '"error"' in line:
                            error = "error event"
                            break
        except httpx.HTTPError as err:
            error = type(err).__name__
        except asyncio.CancelledError:
            self.unfinished += 1
            return
        finally:
            self.in_flight -= 1
        ok = ok and not error
        done = self.now()
        if ok and engine and engine not in self.served:
            self.served[engine] = first if first is not None else done
        if error:
            self.errors[error] = self.errors.get(error, 0) + 1
        self.requests.append(Request(sent=sent, ok=ok, first_token=first, done=done, engine=engine))


def _ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


class Recorder:
    """Samples the fleet every ``period_s`` in a thread: desired, Ready-and-answering, serving, queue."""

    def __init__(
        self,
        kube: BlockingKube,
        namespace: str,
        deployment: str,
        load: OpenLoopLoad,
        prometheus_url: str,
        period_s: float = 0.5,
    ) -> None:
        self._kube = kube
        self.namespace, self.deployment, self.load = namespace, deployment, load
        self._prom = prometheus_url.rstrip("/")
        self.period_s = period_s
        self.samples: list[Sample] = []  # ``serving`` as known then: see ``final()``
        self.ready_pods: list[tuple[str, ...]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Recorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        with httpx.Client(timeout=1.0) as http:
            while not self._stop.is_set():
                with contextlib.suppress(Exception):  # one failed poll is a gap, never the end
                    sample, pods = self._sample(http)
                    self.samples.append(sample)
                    self.ready_pods.append(pods)
                self._stop.wait(self.period_s)

    def final(self) -> list[Sample]:
        """The samples, with ``serving`` from every request's outcome (known only once it ended)."""
        return with_serving(self.samples, self.ready_pods, self.load.served)

    def _sample(self, http: httpx.Client) -> tuple[Sample, tuple[str, ...]]:
        t = self.load.now()
        dep = self._kube.get(resource_path("apps/v1", "deployments", self.namespace, self.deployment))
        assert dep is not None, f"deployment {self.deployment} is gone"
        selector = ",".join(f"{k}={v}" for k, v in dep["spec"]["selector"]["matchLabels"].items())
        pods = self._kube.list(resource_path("v1", "pods", self.namespace), label_selector=selector).items
        ready = []
        for pod in pods:
            ip = (pod.get("status") or {}).get("podIP")
            if pod["metadata"].get("deletionTimestamp") or not ip or not _ready(pod):
                continue
            containers = pod["spec"]["containers"]
            ports = [
                p["containerPort"]
                for c in containers
                for p in c.get("ports") or []
                if p.get("name") == "http"
            ]
            with contextlib.suppress(httpx.HTTPError):
                if http.get(f"http://{ip}:{ports[0]}/health", timeout=0.5).status_code == 200:
                    ready.append(pod["metadata"]["name"])
        served = self.load.served
        sample = Sample(
            t=round(t, 2),
            desired=int(dep["spec"].get("replicas") or 0),
            ready=len(ready),
            serving=sum(1 for name in ready if name in served and served[name] <= t),
            rate=self.load.phases.rate(t),
            in_flight=self.load.in_flight,
            waiting=self._waiting(http),
        )
        return sample, tuple(ready)

    def _waiting(self, http: httpx.Client) -> float | None:
        query = f'sum(vllm:num_requests_waiting{{namespace="{self.namespace}"}})'
        try:
            result = http.get(f"{self._prom}/api/v1/query", params={"query": query}).json()["data"]["result"]
        except (httpx.HTTPError, ValueError, KeyError):
            return None
        return float(result[0]["value"][1]) if result else None
