"""On the GPU machine: real vLLM 0.24 continues the router's trace (docs/tracing.md).

One engine through ``kvstack engine serve`` with ``otlp_traces_endpoint``, the router with
``--tracing-endpoint``, both exporting to the harness's OTLP receiver; one chat request with a client
``traceparent``. Passes when vLLM's ``llm_request`` span is in the client's trace with the router's
``upstream`` span as its parent. Writes ``$OUT/trace-proof.json``; exit status 0 on success.

Setup as in scripts/gpu/README.md, with the OpenTelemetry packages vLLM needs for tracing:
``prepare.py --extra "opentelemetry-sdk opentelemetry-exporter-otlp-proto-http
opentelemetry-exporter-otlp-proto-grpc opentelemetry-proto"``; kvstack as the wheel device.sh
installs into /tmp/kvsite. Then: ``PYTHONPATH=/tmp/site:/tmp/kvsite:tests/support python3
scripts/gpu/trace_proof.py`` (a few minutes: vLLM's start). ``--sim`` runs the same proof with
``kvstack engine sim`` in vLLM's place, on any machine (a check of this script).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

from kvstack_testing.otlp import OTLPReceiver

TRACE, CLIENT_SPAN = "5a5e1ec7c0ffee0000000000000000a1", "00000000000000b2"
ENGINE, ROUTER = "http://127.0.0.1:8100", "http://127.0.0.1:8200"
OUT = Path(os.environ.get("OUT", "/tmp/out"))


def wait(url: str, seconds: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(2)
    raise SystemExit(f"{url} not ready after {seconds} s")


def engine_argv(receiver: OTLPReceiver, sim: bool) -> list[str]:
    """``kvstack engine serve`` of the dummy-weight model (or, with ``sim``, a simulator)."""
    endpoint = f"{receiver.url}/v1/traces"
    if sim:
        return [
            "engine",
            "sim",
            "--port",
            "8100",
            "--served-model-name",
            "kvstack-8b",
            "--otlp-traces-endpoint",
            endpoint,
        ]
    wrapper = Path("/tmp/bin/vllm")  # as scripts/gpu/device.sh: vLLM from /tmp/site
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(
        "#!/bin/bash\nexec python3 -c 'import sys; from vllm.entrypoints.cli.main import main; "
        'sys.argv[0] = "vllm"; sys.exit(main())\' "$@"\n'
    )
    wrapper.chmod(0o755)
    config = OUT / "engine.yaml"
    config.write_text(
        "model: /tmp/model\nserved_model_name: [kvstack-8b]\nhost: 127.0.0.1\nport: 8100\n"
        f"vllm_bin: {wrapper}\nmax_model_len: 4096\ngpu_memory_utilization: 0.3\n"
        "lmcache: {enabled: false}\n"
        f"otlp_traces_endpoint: {endpoint}\notlp_traces_protocol: http/protobuf\n"
        "extra_args: [--load-format, dummy]\n"
        'extra_env: {VLLM_USE_FLASHINFER_SAMPLER: "0", HF_HUB_OFFLINE: "1"}\n'
    )
    return ["engine", "serve", "--config", str(config)]


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    receiver = OTLPReceiver()
    env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_SERVICE_NAME": "vllm"}
    kvstack = [sys.executable, "-m", "kvstack"]
    argv = engine_argv(receiver, "--sim" in sys.argv[1:])
    with (OUT / "engine.log").open("wb") as elog, (OUT / "router.log").open("wb") as rlog:
        engine = subprocess.Popen([*kvstack, *argv], env=env, stdout=elog, stderr=elog)
        router = subprocess.Popen(
            [*kvstack, "router", "--port", "8200", "--engine", ENGINE, "--model", "kvstack-8b",
             "--tracing-endpoint", receiver.url],
            env=env, stdout=rlog, stderr=rlog,
        )  # fmt: skip
        try:
            wait(f"{ENGINE}/health", 600, engine)
            wait(f"{ROUTER}/ready", 60, router)
            body = {
                "model": "kvstack-8b",
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 8,
            }
            request = urllib.request.Request(
                f"{ROUTER}/v1/chat/completions",
                data=json.dumps(body).encode(),
                headers={"content-type": "application/json", "traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01"},
            )
            status = urllib.request.urlopen(request, timeout=120).status
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(
                s.name == "llm_request" for s in receiver.spans(TRACE)
            ):
                time.sleep(0.5)
        finally:
            router.terminate()
            engine.terminate()
            router.wait(30)
            engine.wait(60)
    spans = receiver.spans(TRACE)
    upstream = [s.span_id for s in spans if s.name == "upstream"]
    vllm = [s for s in spans if s.name == "llm_request"]
    ok = status == 200 and len(vllm) == 1 and vllm[0].parent_span_id in upstream
    result = {"ok": ok, "status": status, "spans": [asdict(s) for s in spans]}
    (OUT / "trace-proof.json").write_text(json.dumps(result, indent=1, default=str))
    print("the engine continued the router's trace" if ok else "FAILED: see trace-proof.json and the logs")
    receiver.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
