"""``kvstack up``: the pure plan, and the real thing started, used and stopped with SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import openai
import pytest
import redis
import yaml
from openai.types.chat import ChatCompletionMessageParam
from tests.conftest import free_port

from kvstack.bench import promtext
from kvstack.common.config import ConfigError, build
from kvstack.common.waits import wait_until
from kvstack.stack.plan import (
    EnginePorts,
    StackSettings,
    banner,
    engine_entries,
    plan_stack,
    preflight,
    redis_argv,
)
from kvstack_testing.otlp import otlp_receiver

PORTS = [EnginePorts(9101, 9102, 9103), EnginePorts(9201, 9202, 9203)]
REDIS = 9300


def test_plan_for_simulators() -> None:
    settings = StackSettings(port=8123, policy="session", speed=0.5)
    specs = plan_stack(settings, PORTS, Path("/run/engines.yaml"), REDIS)
    assert [s.name for s in specs] == ["redis", "engine-0", "engine-1", "router"]
    redis = specs[0]
    assert redis.argv[0] == "redis-server" and redis.argv[redis.argv.index("--port") + 1] == "9300"
    assert redis.ready_redis_port == REDIS and redis.ready_url is None
    assert redis.argv[redis.argv.index("--dir") + 1] == "/run"
    sim = specs[1].argv
    assert sim[1:3] == ["engine", "sim"]
    assert sim[sim.index("--port") + 1] == "9101"
    assert sim[sim.index("--kv-events-endpoint") + 1] == "tcp://127.0.0.1:9102"
    assert sim[sim.index("--kv-events-replay-endpoint") + 1] == "tcp://127.0.0.1:9103"
    assert sim[sim.index("--speed") + 1] == "0.5"
    # every engine's LMCache connector shares one Redis tier and one hash seed, or nothing is shared
    for engine in specs[1:3]:
        assert "--lmcache" in engine.argv
        assert engine.argv[engine.argv.index("--lmcache-remote-url") + 1] == "redis://127.0.0.1:9300"
        assert engine.env["PYTHONHASHSEED"] == specs[1].env["PYTHONHASHSEED"]
    router = specs[-1].argv
    assert router[router.index("--engines-file") + 1] == "/run/engines.yaml"
    assert router[router.index("--policy") + 1] == "session"
    assert specs[-1].ready_url == "http://127.0.0.1:8123/ready"
    entries = engine_entries(settings, PORTS)
    assert entries[1]["url"] == "http://127.0.0.1:9201"
    assert entries[1]["kv_events_endpoint"] == "tcp://127.0.0.1:9202"


@pytest.mark.parametrize(("bound", "expected"), [({}, "256mb"), ({"maxmemory": "64mb"}, "64mb")])
def test_a_throwaway_redis_is_bounded_evicting_and_keeps_nothing(
    bound: dict[str, str], expected: str
) -> None:
    argv = redis_argv(9300, Path("/w"), binary="/bin/redis", **bound)
    flags = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert argv[0] == "/bin/redis"
    assert flags == {
        "--port": "9300",
        "--bind": "127.0.0.1",
        "--save": "",
        "--appendonly": "no",
        "--dir": "/w",
        "--maxmemory": expected,
        "--maxmemory-policy": "allkeys-lru",
    }


def test_plan_without_lmcache_starts_no_redis() -> None:
    specs = plan_stack(StackSettings(lmcache=False), PORTS, Path("/e.yaml"))
    assert [s.name for s in specs] == ["engine-0", "engine-1", "router"]
    assert not any(a.startswith("--lmcache") for a in specs[0].argv)
    assert "LMCache:     off" in banner(StackSettings(lmcache=False), PORTS)


def test_plan_with_lmcache_needs_a_redis_port() -> None:
    with pytest.raises(ValueError, match="Redis port"):
        plan_stack(StackSettings(), PORTS, Path("/e.yaml"))


def test_plan_for_vllm_sets_one_gpu_and_kv_events_per_engine() -> None:
    settings = StackSettings(engine="vllm", model="meta-llama/Llama-3.1-8B-Instruct")
    specs = plan_stack(settings, PORTS, Path("/e.yaml"), REDIS)[1:]
    assert specs[1].argv[1:] == ["engine", "serve"]
    assert specs[1].env["CUDA_VISIBLE_DEVICES"] == "1"
    assert specs[1].env["KVSTACK_ENGINE_PORT"] == "9201"
    assert specs[1].env["KVSTACK_ENGINE_KV_EVENTS__ENABLED"] == "true"
    assert specs[1].env["KVSTACK_ENGINE_LMCACHE__REMOTE_URL"] == "redis://127.0.0.1:9300"
    assert specs[0].env["PYTHONHASHSEED"] == specs[1].env["PYTHONHASHSEED"]
    assert settings.ready_timeout == 600.0
    shown = banner(settings, PORTS, REDIS)
    assert "meta-llama/Llama-3.1-8B-Instruct" in shown
    assert "http://127.0.0.1:9101 http://127.0.0.1:9201" in shown
    assert "redis://127.0.0.1:9300" in shown


@pytest.mark.parametrize(
    ("settings", "missing", "busy", "problems"),
    [
        (StackSettings(), set(), set(), []),
        (
            StackSettings(),
            {"redis-server"},
            set(),
            [
                "redis-server not found on PATH (LMCache's shared tier; install it with `make sysdeps` "
                "or run with --no-lmcache)"
            ],
        ),
        (
            StackSettings(prometheus=True, prometheus_port=9999),
            {"prometheus"},
            {9999},
            [
                "prometheus not found on PATH (install it with `make sysdeps` or run without --prometheus)",
                "port 9999 on 127.0.0.1 is in use (--prometheus-port picks another)",
            ],
        ),
        (
            StackSettings(port=8123),
            set(),
            {8123},
            ["port 8123 on 127.0.0.1 is in use (--port picks another)"],
        ),
        (StackSettings(), {"vllm-thing"}, set(), ["vllm-thing not found on PATH (is it installed?)"]),
        (StackSettings(prometheus_port=9999), set(), {9999}, []),  # not ours to bind without --prometheus
    ],
)
def test_preflight_names_each_problem_in_one_line(
    settings: StackSettings, missing: set[str], busy: set[int], problems: list[str]
) -> None:
    programs = ["redis-server", "/venv/bin/kvstack", "/venv/bin/kvstack", "prometheus", "vllm-thing"]
    found = preflight(
        settings,
        programs,
        lambda name: None if name in missing else f"/usr/bin/{name}",
        lambda _host, port: port not in busy,
    )
    assert found == problems


@pytest.mark.parametrize("engine", ["sim", "vllm"])
def test_plan_with_a_tracing_endpoint_traces_the_router_and_every_engine(engine: str) -> None:
    endpoint = "http://127.0.0.1:4318"
    settings = StackSettings(engine=engine, model="m", tracing_endpoint=endpoint)
    specs = plan_stack(settings, PORTS, Path("/e.yaml"), REDIS)
    router = specs[-1].argv
    assert router[router.index("--tracing-endpoint") + 1] == endpoint
    for spec in specs[1:3]:
        if engine == "sim":
            assert spec.argv[spec.argv.index("--otlp-traces-endpoint") + 1] == endpoint
        else:
            # vLLM posts to the URL as given: the collector's base URL gets the traces path
            assert spec.env["KVSTACK_ENGINE_OTLP_TRACES_ENDPOINT"] == f"{endpoint}/v1/traces"


def test_kvstack_up_with_a_tracing_endpoint_exports_router_and_engine_spans_of_one_trace() -> None:
    port = free_port()
    with otlp_receiver() as receiver:
        flags = ["--port", str(port), "--no-lmcache", "--tracing-endpoint", receiver.url]
        with _kvstack_up(*flags) as (proc, shown):
            assert f"Tracing:     spans of the router and the engines to {receiver.url}" in shown
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
            client.chat.completions.create(
                model="kvstack/sim-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )

            def services_of_one_trace() -> bool:
                by_trace: dict[str, set[str]] = {}
                for span in receiver.spans():
                    by_trace.setdefault(span.trace_id, set()).add(span.service)
                return any({"kvstack-router", "vllm"} <= services for services in by_trace.values())

            wait_until(services_of_one_trace, "router and engine spans of one trace", 30, 0.2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0


def test_plan_without_a_tracing_endpoint_traces_nothing() -> None:
    specs = plan_stack(StackSettings(), PORTS, Path("/e.yaml"), REDIS)
    assert not any("--tracing-endpoint" in s.argv or "--otlp-traces-endpoint" in s.argv for s in specs)
    vllm = plan_stack(StackSettings(engine="vllm", model="m"), PORTS, Path("/e.yaml"), REDIS)
    assert not any("KVSTACK_ENGINE_OTLP_TRACES_ENDPOINT" in s.env for s in vllm)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"tracing_endpoint": "localhost:4318"}, "tracing_endpoint"),
        ({"engine": "vllm"}, "--model"),
        ({"engine": "vllm", "model": "m", "speed": 2.0}, "--speed"),
        ({"engines": 0}, "engines"),
        ({"engine": "trt"}, "engine"),
        ({"policy": "fastest"}, "policy"),
    ],
)
def test_bad_options_are_named(values: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        build(StackSettings, "kvstack up options", **values)


@contextlib.contextmanager
def _kvstack_up(*flags: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``kvstack up`` with ``flags``, in a session of its own, and its banner; the whole session is
    killed at the end if the test did not stop it."""
    kvstack = str(Path(sys.executable).with_name("kvstack"))
    proc = subprocess.Popen(
        [kvstack, "up", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        yield proc, _read_banner(proc.stdout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _read_banner(stdout: IO[str]) -> str:
    """``kvstack up``'s output up to and with its "Press Ctrl-C" line, read within 60 s."""
    lines: list[str] = []

    def next_line() -> bool:
        line = stdout.readline()
        assert line, f"kvstack up ended before its banner: {''.join(lines)}"
        lines.append(line)
        return "Press Ctrl-C" in line

    wait_until(next_line, "kvstack up's banner", 60, 0)  # each readline blocks: no pause between
    return "".join(lines)


def _listening(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=1)
        return True
    except httpx.TransportError:
        return False


def test_cache_aware_is_the_default_policy() -> None:
    specs = plan_stack(StackSettings(), PORTS, Path("/e.yaml"), REDIS)
    assert specs[-1].argv[specs[-1].argv.index("--policy") + 1] == "cache_aware"


@pytest.mark.parametrize(("stop_signal", "policy"), [(signal.SIGTERM, None), (signal.SIGINT, "least_loaded")])
def test_kvstack_up_serves_and_stops_cleanly(stop_signal: signal.Signals, policy: str | None) -> None:
    port = free_port()
    flags = [] if policy is None else ["--policy", policy]
    with _kvstack_up("--port", str(port), *flags) as (proc, output):
        assert "(logs in " in output and "kvstack is up" in output, output
        run_dir = Path(output.split("(logs in ", 1)[1].split(")\n", 1)[0])
        shown = output[output.index("kvstack is up") :]
        assert f"curl http://127.0.0.1:{port}/v1/chat/completions" in shown
        assert f'OpenAI(base_url="http://127.0.0.1:{port}/v1"' in shown
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="kvstack/sim-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.choices[0].message.content
        used = policy or "cache_aware"
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert f'kvstack_router_routing_decisions_total{{policy="{used}"' in metrics
        if used == "cache_aware":  # the engines' KV events reach the router's index
            none = "kvstack_router_kv_event_batches_applied_total 0.0"
            scrape = f"http://127.0.0.1:{port}/metrics"
            wait_until(lambda: none not in httpx.get(scrape).text, "KV events from the engines", 10, 0.2)
        engines = [e["url"] for e in yaml.safe_load((run_dir / "engines.yaml").read_text())]
        assert len(engines) == 2 and all(_listening(u) for u in engines)
        proc.send_signal(stop_signal)
        assert proc.wait(30) == 0
        for url in [*engines, f"http://127.0.0.1:{port}"]:
            assert not _listening(url), f"{url} still running after kvstack up stopped"


def test_kvstack_up_with_prometheus_scrapes_router_and_engines() -> None:
    """`kvstack up --prometheus`: the user gets a Prometheus that already scrapes every component."""
    port, prom_port = free_port(), free_port()
    flags = ["--port", str(port), "--prometheus", "--prometheus-port", str(prom_port)]
    with _kvstack_up(*flags) as (proc, shown):
        assert f"Prometheus:  http://127.0.0.1:{prom_port}" in shown, shown

        def jobs_up() -> list[str]:
            targets = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/targets").json()["data"][
                "activeTargets"
            ]
            return sorted(t["labels"]["job"] for t in targets if t["health"] == "up")

        want = ["kvstack-engine", "kvstack-engine", "kvstack-router"]
        wait_until(lambda: jobs_up() == want, f"Prometheus targets {want} all up", 60, 0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not _listening(f"http://127.0.0.1:{prom_port}"), (
            "Prometheus still running after kvstack up stopped"
        )


def _external_hits(engine_url: str) -> float:
    return promtext.total(promtext.scrape(f"{engine_url}/metrics"), "vllm:external_prefix_cache_hits_total")


def test_kvstack_up_shares_kv_between_simulators_through_its_redis() -> None:
    """A prefix one simulator computed is loaded from the stack's Redis by the other one."""
    port = free_port()
    with _kvstack_up("--port", str(port), "--engines", "2") as (proc, shown):
        engines = shown.split("Engines:", 1)[1].splitlines()[0].split()
        url = shown.split("LMCache:     shared tier ", 1)[1].split()[0]
        assert len(engines) == 2 and url.startswith("redis://127.0.0.1:"), shown
        store = redis.Redis.from_url(url)
        # ~2,000 tokens: several 256-token LMCache chunks
        prompt = " ".join(f"section {i} of the shared system prompt says hello" for i in range(250))
        first, second = (openai.OpenAI(base_url=f"{e}/v1", api_key="unused", max_retries=0) for e in engines)
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": prompt}]
        first.chat.completions.create(model="kvstack/sim-8b", messages=messages, max_tokens=2)
        # the first engine offloads its chunks to Redis in the background
        wait_until(lambda: store.dbsize() > 0, "chunks of the first engine in Redis", 20, 0.1)
        assert _external_hits(engines[1]) == 0
        second.chat.completions.create(model="kvstack/sim-8b", messages=messages, max_tokens=2)
        assert _external_hits(engines[1]) >= 256  # at least one chunk from the shared tier
        assert _external_hits(engines[0]) == 0  # it computed the prompt itself
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        with pytest.raises(redis.ConnectionError):
            store.ping()  # the stack's Redis stopped with it
