"""The engine argv the chart renders in simulator mode starts the real ``kvstack engine sim``.

The rendered command and args run here as the pod would run them, bound to loopback ports instead
of the pod's 0.0.0.0 (and with the API key Kubernetes would expand from the Secret); the openai SDK
then lists and uses the served model name, with the key.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from tests.helm.conftest import HelmChart

from kvstack.common.procs import ManagedProcess, free_ports
from kvstack_testing.pod_sims import kvstack_executable

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def test_rendered_simulator_argv_serves_the_openai_sdk(chart: HelmChart, tmp_path: Path) -> None:
    rendered = chart.template(
        set_values=[
            "engines.simulator.enabled=true",
            "engines.apiKey.existingSecret=engine-key",
            "lmcache.remote.mode=none",
            "engines.models[0].name=llama-8b",
            f"engines.models[0].model={MODEL}",
            "engines.models[0].servedModelNames={llama}",
        ]
    )
    (engine,) = rendered.one("Deployment", "-engine-llama-8b")["spec"]["template"]["spec"]["containers"]
    http, events, replay = free_ports(3)
    pod_to_here = {"0.0.0.0": "127.0.0.1", "8000": str(http), "tcp://*:5557": f"tcp://127.0.0.1:{events}"}
    pod_to_here |= {"tcp://*:5558": f"tcp://127.0.0.1:{replay}", "$(KVSTACK_ENGINE_API_KEY)": "s3cret"}
    argv = [pod_to_here.get(a, a) for a in [*engine["command"], *engine["args"]]]
    assert argv[0] == "kvstack"
    sim = ManagedProcess(
        "sim", [kvstack_executable(), *argv[1:]], tmp_path, ready_url=f"http://127.0.0.1:{http}/health"
    )
    try:
        sim.start().wait_ready(60)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in client.models.list()] == ["llama"]
        reply = client.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
        )
        assert reply.choices[0].message.content
        wrong_key = openai.OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong_key.models.list()
    finally:
        sim.stop()
