"""``kvstack up``: the pure plan, and the real thing started, used and stopped with SIGTERM/SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from tests.conftest import free_port

from kvstack.common.config import ConfigError, build
from kvstack.stack.plan import EnginePorts, StackSettings, banner, engine_entries, plan_stack

PORTS = [EnginePorts(9101, 9102, 9103), EnginePorts(9201, 9202, 9203)]


def test_plan_for_simulators() -> None:
    settings = StackSettings(port=8123, policy="session", speed=0.5)
    specs = plan_stack(settings, PORTS, Path("/run/engines.yaml"))
    assert [s.name for s in specs] == ["engine-0", "engine-1", "router"]
    sim = specs[0].argv
    assert sim[1:3] == ["engine", "sim"]
    assert sim[sim.index("--port") + 1] == "9101"
    assert sim[sim.index("--kv-events-endpoint") + 1] == "tcp://127.0.0.1:9102"
    assert sim[sim.index("--kv-events-replay-endpoint") + 1] == "tcp://127.0.0.1:9103"
    assert sim[sim.index("--speed") + 1] == "0.5"
    router = specs[-1].argv
    assert router[router.index("--engines-file") + 1] == "/run/engines.yaml"
    assert router[router.index("--policy") + 1] == "session"
    assert specs[-1].ready_url == "http://127.0.0.1:8123/ready"
    entries = engine_entries(settings, PORTS)
    assert entries[1]["url"] == "http://127.0.0.1:9201"
    assert entries[1]["kv_events_endpoint"] == "tcp://127.0.0.1:9202"


def test_plan_for_vllm_sets_one_gpu_and_kv_events_per_engine() -> None:
    settings = StackSettings(engine="vllm", model="meta-llama/Llama-3.1-8B-Instruct")
    specs = plan_stack(settings, PORTS, Path("/e.yaml"))
    assert specs[1].argv[1:] == ["engine", "serve"]
    assert specs[1].env["CUDA_VISIBLE_DEVICES"] == "1"
    assert specs[1].env["KVSTACK_ENGINE_PORT"] == "9201"
    assert specs[1].env["KVSTACK_ENGINE_KV_EVENTS__ENABLED"] == "true"
    assert specs[0].env["PYTHONHASHSEED"] == specs[1].env["PYTHONHASHSEED"]
    assert settings.ready_timeout == 600.0
    assert "meta-llama/Llama-3.1-8B-Instruct" in banner(settings)


@pytest.mark.parametrize(
    ("values", "field"),
    [
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


def _listening(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=1)
        return True
    except httpx.TransportError:
        return False


def test_cache_aware_is_the_default_policy() -> None:
    specs = plan_stack(StackSettings(), PORTS, Path("/e.yaml"))
    assert specs[-1].argv[specs[-1].argv.index("--policy") + 1] == "cache_aware"


@pytest.mark.parametrize(("stop_signal", "policy"), [(signal.SIGTERM, None), (signal.SIGINT, "least_loaded")])
def test_kvstack_up_serves_and_stops_cleanly(stop_signal: signal.Signals, policy: str | None) -> None:
    port = free_port()
    kvstack = str(Path(sys.executable).with_name("kvstack"))
    flags = [] if policy is None else ["--policy", policy]
    proc = subprocess.Popen(
        [kvstack, "up", "--port", str(port), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    run_dir: Path | None = None
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        banner_lines: list[str] = []
        for line in proc.stdout:
            if "logs in" in line:
                run_dir = Path(line.rsplit("logs in ", 1)[1].strip().rstrip(")"))
            if "kvstack is up" in line or banner_lines:
                banner_lines.append(line)
            if "Press Ctrl-C" in line:
                break
            assert time.monotonic() < deadline
        assert run_dir is not None
        shown = "".join(banner_lines)
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
            deadline = time.monotonic() + 10
            while "kvstack_router_kv_event_batches_applied_total 0.0" in metrics:
                assert time.monotonic() < deadline, "no KV events from the engines"
                time.sleep(0.2)
                metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        engines = [e["url"] for e in yaml.safe_load((run_dir / "engines.yaml").read_text())]
        assert len(engines) == 2 and all(_listening(u) for u in engines)
        proc.send_signal(stop_signal)
        assert proc.wait(30) == 0
        for url in [*engines, f"http://127.0.0.1:{port}"]:
            assert not _listening(url), f"{url} still running after kvstack up stopped"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_kvstack_up_with_prometheus_scrapes_router_and_engines() -> None:
    """`kvstack up --prometheus`: the user gets a Prometheus that already scrapes every component."""
    port, prom_port = free_port(), free_port()
    kvstack = str(Path(sys.executable).with_name("kvstack"))
    proc = subprocess.Popen(
        [kvstack, "up", "--port", str(port), "--prometheus", "--prometheus-port", str(prom_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        shown = ""
        for line in proc.stdout:
            shown += line
            if "Press Ctrl-C" in line:
                break
        assert f"Prometheus:  http://127.0.0.1:{prom_port}" in shown, shown
        deadline = time.monotonic() + 60
        while True:
            targets = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/targets").json()["data"][
                "activeTargets"
            ]
            healthy = sorted(t["labels"]["job"] for t in targets if t["health"] == "up")
            if healthy == ["kvstack-engine", "kvstack-engine", "kvstack-router"]:
                break
            assert time.monotonic() < deadline, f"targets never all up: {targets}"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not _listening(f"http://127.0.0.1:{prom_port}"), (
            "Prometheus still running after kvstack up stopped"
        )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
