"""A live stack for the dashboard tests: Redis, simulators, the router and Prometheus, under load.

Two models: ``sim-a`` on two simulators and ``sim-b`` on one, which the harness kills once the load
is flowing, so that failure paths (retries, ejections, 5xx, engine down) have series too.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import redis
import yaml
from tests.conftest import free_port

from kvstack.bench.promtext import scrape, total
from kvstack.common.procs import ManagedProcess, running
from kvstack.common.waits import wait_until
from kvstack.observability.prometheus import PrometheusAPI, Target, prometheus_process
from kvstack.router.discovery.static import sim_engine_entry
from kvstack.stack.plan import redis_argv

KVSTACK = str(Path(sys.executable).with_name("kvstack"))
MODEL_A, MODEL_B = "sim-a", "sim-b"
SYSTEM = "You are a careful assistant for a platform team. " * 40  # a prefix shared across requests


def redis_exporter_binary() -> str | None:
    """The redis_exporter, if installed (Debian: prometheus-redis-exporter)."""
    return (
        os.environ.get("KVSTACK_REDIS_EXPORTER")
        or shutil.which("prometheus-redis-exporter")
        or shutil.which("redis_exporter")
    )


@dataclass
class Stack:
    prom: PrometheusAPI
    router_url: str
    killed_pod: str
    has_redis_exporter: bool
    procs: dict[str, ManagedProcess] = field(default_factory=dict)
    engine_urls: dict[str, str] = field(default_factory=dict)  # by pod name


class Load:
    """Streaming chat requests through the router from a few threads, until stopped."""

    def __init__(self, router_url: str, threads: int = 3) -> None:
        self.client = openai.OpenAI(base_url=f"{router_url}/v1", api_key="unused", max_retries=0, timeout=30)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        self.sent = 0
        self.running = threading.Event()  # cleared: the threads finish their request and wait
        self.running.set()
        self.idle = threading.Semaphore(0)  # one release per thread that stopped at a pause

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No request of the load is in flight inside the block."""
        self.running.clear()
        for _ in self.threads:
            if not self.idle.acquire(timeout=35):
                raise AssertionError("a load thread did not pause")
        try:
            yield
        finally:
            self.running.set()

    def _run(self, worker: int) -> None:
        n = 0
        while not self.stop.is_set():
            if not self.running.is_set():
                self.idle.release()
                self.running.wait()
            n += 1
            model = MODEL_B if n % 4 == 0 else MODEL_A
            try:
                stream = self.client.chat.completions.create(
                    # flow control: "strict" (an objective nothing meets) beside "default" (one
                    # everything meets), so goodput and objective misses both have series
                    extra_headers={"x-kvstack-priority": "strict" if n % 2 else "default"},
                    model=model,
                    messages=[
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": f"question {worker}-{n % 7}"},
                    ],
                    max_tokens=24,
                    stream=True,
                )
                for _ in stream:
                    pass
                self.sent += 1
            except openai.APIError:
                time.sleep(0.05)  # sim-b is gone: the router answers 5xx, which the dashboards show

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(35)


def flow_queue_burst(router_url: str, n: int = 24) -> None:
    """More requests at once than the engines' in-flight ceiling holds, until some waited in the
    router's flow queue (its gauge then exists)."""
    body = {
        "model": MODEL_A,
        "messages": [{"role": "user", "content": "burst"}],
        "max_tokens": 200,
        "ignore_eos": True,
    }

    def one() -> None:
        httpx.post(f"{router_url}/v1/chat/completions", json=body, timeout=30)

    def queued() -> bool:
        threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(35)
        return "kvstack_router_flow_queue_length{" in httpx.get(f"{router_url}/metrics", timeout=10).text

    wait_until(queued, "a burst to wait in the router's flow queue", 60, 0.1)


def disconnect_mid_stream(router_url: str) -> str:
    """Read the first chunk of a long stream, then hang up (the router counts a disconnect).
    Returns what happened, for the caller's message: the stream's status and first bytes."""
    body = {
        "model": MODEL_A,
        "messages": [{"role": "user", "content": "long"}],
        "max_tokens": 2000,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{router_url}/v1/chat/completions", json=body, timeout=30) as resp:
        for chunk in resp.iter_raw():
            return f"{resp.status_code}: {chunk[:120]!r}"
        return f"{resp.status_code}: no body"


def disconnects_counted(router_url: str, count: int = 2) -> None:
    """Hang up mid-stream ``count`` times; the router's own /metrics must count every one. (It once
    missed some: a cancel that met the compiled relay's forward before its thread took the socket
    left the request waiting forever, tests/router_native/test_forward.py.)"""
    seen = [disconnect_mid_stream(router_url) for _ in range(count)]

    def counted() -> float:
        return total(scrape(f"{router_url}/metrics", 10), "kvstack_router_client_disconnects_total")

    what = f"the router to count {count} disconnects (the streams: {seen})"
    wait_until(lambda: counted() >= count, what, 20, 0.1)


def _wait_engines(router_url: str, count: int, timeout: float = 30.0) -> None:
    def ready() -> bool:
        engines = httpx.get(f"{router_url}/ready", timeout=2).json()["available_engines"]
        models = {m["id"] for m in httpx.get(f"{router_url}/v1/models", timeout=2).json()["data"]}
        return bool(engines == count and {MODEL_A, MODEL_B} <= models)

    wait_until(ready, f"the router to see {count} engines serving {MODEL_A} and {MODEL_B}", timeout, 0.1)


@contextmanager
def live_stack(tmp: Path, repo_root: Path) -> Iterator[Stack]:
    redis_port = free_port()
    # bounded and evicting, as the chart's Redis is (the Redis panels plot used vs max)
    redis_proc = ManagedProcess("redis", redis_argv(redis_port, tmp), tmp)
    sims: list[tuple[str, str, ManagedProcess]] = []
    engines: list[dict[str, Any]] = []
    for pod, model in (("sim-a-0", MODEL_A), ("sim-a-1", MODEL_A), ("sim-b-0", MODEL_B)):
        port, pub, replay = free_port(), free_port(), free_port()
        url = f"http://127.0.0.1:{port}"
        entry = sim_engine_entry(pod, http=port, kv_events=pub, kv_replay=replay)
        # sim-b also answers to sim-a: after the kill, sim-a requests routed to it are retried on the
        # two sim-a engines (a real retry), while sim-b's own model is left with no engine
        names = [
            "--served-model-name",
            model,
            *(["--served-model-name", MODEL_A] if model == MODEL_B else []),
        ]
        argv = [KVSTACK, "engine", "sim", "--port", str(port), "--model", model, *names, "--lmcache",
                "--lmcache-remote-url", f"redis://127.0.0.1:{redis_port}",
                "--kv-events-endpoint", entry["kv_events_endpoint"],
                "--kv-events-replay-endpoint", entry["kv_events_replay_endpoint"]]  # fmt: skip
        if pod == "sim-a-0":
            argv.append("--enable-lora")  # exports vllm:lora_requests_info (the LoRA adapters panel)
        # one hash seed for every engine, as the chart sets: LMCache shares chunks between them
        env = {"PYTHONHASHSEED": "0"}
        sims.append((pod, url, ManagedProcess(pod, argv, tmp, env=env, ready_url=f"{url}/health")))
        engines.append(entry)
    engines_file = tmp / "engines.yaml"
    engines_file.write_text(yaml.safe_dump(engines))
    router_port = free_port()
    router_url = f"http://127.0.0.1:{router_port}"
    # cache_aware: its KV-event and index series exist, and the engine label is the pod name.
    router_argv = [KVSTACK, "router", "--port", str(router_port), "--engines-file", str(engines_file),
                   "--policy", "cache_aware"]  # fmt: skip
    router_env = {
        # a low ceiling: the burst below queues in the router's flow queue (its gauges exist)
        "KVSTACK_ROUTER_MAX_IN_FLIGHT_PER_ENGINE": "4",
        "KVSTACK_ROUTER_FLOW_CONTROL__CLASSES": '[{"name": "default", "ttft_objective_s": 60},'
        ' {"name": "strict", "ttft_objective_s": 0.000001}]',
        "KVSTACK_ROUTER_EJECT_AFTER_FAILURES": "1",
        # slow probes: the killed engine is found by the request path (retry, ejection), not a probe
        "KVSTACK_ROUTER_MONITOR__PROBE_INTERVAL": "20",
        "KVSTACK_ROUTER_MONITOR__MODELS_INTERVAL": "1",
        "KVSTACK_ROUTER_LOG_LEVEL": "warning",
    }
    router = ManagedProcess("router", router_argv, tmp, env=router_env, ready_url=f"{router_url}/ready")
    targets = [Target("kvstack-engine", url, pod) for pod, url, _ in sims]
    targets.append(Target("kvstack-router", router_url, "router-0"))
    exporter_bin = redis_exporter_binary()
    extra: list[ManagedProcess] = []
    if exporter_bin:
        exp_port = free_port()
        extra.append(
            ManagedProcess(
                "redis-exporter",
                [
                    exporter_bin,
                    "-redis.addr",
                    f"redis://127.0.0.1:{redis_port}",
                    "-web.listen-address",
                    f"127.0.0.1:{exp_port}",
                ],
                tmp,
                ready_url=f"http://127.0.0.1:{exp_port}/metrics",
            )
        )
        targets.append(Target("kvstack-redis", f"http://127.0.0.1:{exp_port}", "redis-0"))
    prom_port = free_port()
    prom = prometheus_process(
        tmp / "prometheus",
        targets,
        prom_port,
        rule_files=[repo_root / "dashboards/rules/kvstack.rules.yaml"],
        scrape_interval="1s",
    )
    with ExitStack() as stack:
        stack.enter_context(running([redis_proc]))
        _wait_redis(redis_port)
        stack.enter_context(running([p for _, _, p in sims], timeout=60))
        stack.enter_context(running([router, *extra, prom], timeout=60))
        _wait_engines(router_url, 3)
        api = PrometheusAPI(f"http://127.0.0.1:{prom_port}")
        load = stack.enter_context(Load(router_url))
        api.wait_for(
            f'sum(rate(kvstack_router_time_to_first_token_seconds_count{{model_name="{MODEL_A}"}}[15s])) > 0'
        )
        disconnects_counted(router_url)
        flow_queue_burst(router_url)
        # Kill sim-b: its next requests fail, are retried, eject it and end in 5xx. The load pauses
        # meanwhile: one of its sim-b requests (no other engine to retry on) would eject sim-b
        # before any sim-a request reached it, and no retry would ever happen.
        killed, _, killed_proc = sims[2]
        with load.paused():
            killed_proc.stop()
            _requests_to_dead_engine(router_url)
        api.wait_for(f'up{{pod="{killed}"}} == 0')
        yield Stack(
            api,
            router_url,
            killed,
            exporter_bin is not None,
            {"router": router, **{pod: p for pod, _, p in sims}},
            {pod: url for pod, url, _ in sims},
        )


def _requests_to_dead_engine(router_url: str) -> None:
    """New sim-a prompts until one lands on the dead engine and is retried (the router spreads new
    prompts by load, and the dead engine holds none), then sim-b's, which fail: no engine is left."""
    for i in range(40):
        body = {"model": MODEL_A, "messages": [{"role": "user", "content": f"retry me {i}"}], "max_tokens": 4}
        httpx.post(f"{router_url}/v1/chat/completions", json=body, timeout=10)
        if "kvstack_router_retries_total{" in httpx.get(f"{router_url}/metrics", timeout=10).text:
            break
    else:
        raise AssertionError("40 new sim-a prompts and none was retried off the dead engine")
    body = {"model": MODEL_B, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for _ in range(3):
        httpx.post(f"{router_url}/v1/chat/completions", json=body, timeout=10)


def _wait_redis(port: int, timeout: float = 10.0) -> None:
    client = redis.Redis(host="127.0.0.1", port=port)

    def pongs() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_until(pongs, "redis to answer PING", timeout=timeout, interval=0.05)
