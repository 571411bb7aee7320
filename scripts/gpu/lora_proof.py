"""The LoRA proof on real vLLM 0.24 (H200): adapters loaded at runtime through kvstack's client, routed
only where they are loaded, and their KV kept apart (the router's predicted hits match the engines').

Run on the GPU machine after ``setup.sh`` (vLLM in /tmp/site, the 8B-shaped model in /tmp/model) and
with kvstack installed into /tmp/kvsite (``device.sh`` does that from the carried wheel)::

    export PYTHONPATH=/tmp/site:/tmp/kvsite VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    python3 scripts/gpu/lora_proof.py --out $OUT

What it does:

1. writes four PEFT adapters with random weights for the model's shape (rank 8 on q_proj and v_proj:
   ``adapter_config.json`` + ``adapter_model.safetensors``);
2. starts two engines through ``kvstack engine serve`` (``--load-format dummy``, ``--enable-lora
   --max-loras 2 --max-lora-rank 8``, runtime updating on, KV events on);
3. loads ``sql`` on gpu0 only and ``chat`` on both, through :class:`kvstack.common.lora.LoraClient`;
4. starts the router (cache-aware, engines' adapters learnt from /v1/models) and checks, with the
   engines' own ``vllm:prefix_cache_hits_total`` and the router's predicted hit tokens:
   * every ``sql`` request lands on gpu0;
   * one long prompt under ``sql`` then under ``chat`` *on the same engine* hits nothing the second
     time (vLLM scopes block hashes by adapter), and again under ``sql`` hits the whole prompt;
   * through the router, the prediction for each request equals what the engine counted (within one
     block: vLLM never hits a prompt's last token);
5. measures an adapter swap: on gpu1 (max_loras 2) short prompts cycling three adapters (every step
   copies one in) against one adapter repeated: the TTFT difference is ``latency.lora_swap_s``.

Results: ``$OUT/lora_proof.json`` (every check with its numbers) and the engine/router logs' tails.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

MODEL_DIR = "/tmp/model"
SERVED = "kvstack-8b"
RANK = 8
HIDDEN, LAYERS, KV_DIM = 4096, 32, 8 * 128  # Llama-3-8B: 8 KV heads of 128


def write_adapter(folder: Path, seed: int) -> None:
    """A PEFT LoRA adapter with random weights for the 8B shape (q_proj and v_proj, rank 8)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": MODEL_DIR,
        "r": RANK,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": ["q_proj", "v_proj"],
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for proj, out_dim in (("q_proj", HIDDEN), ("v_proj", KV_DIM)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            a = torch.randn(RANK, HIDDEN, generator=gen) * 0.01
            b = torch.randn(out_dim, RANK, generator=gen) * 0.01
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def engine_yaml(i: int) -> str:
    return f"""model: {MODEL_DIR}
served_model_name: [{SERVED}]
host: 127.0.0.1
port: {8200 + i}
max_model_len: 8192
gpu_memory_utilization: 0.3
kv_events:
  enabled: true
  endpoint: "tcp://*:{5657 + 2 * i}"
  replay_endpoint: "tcp://*:{5658 + 2 * i}"
  topic: kv-events
lmcache: {{enabled: false}}
lora: {{max_loras: 2, max_lora_rank: {RANK}, max_cpu_loras: 4}}
python_hash_seed: "0"
extra_args: [--load-format, dummy]
extra_env: {{VLLM_USE_FLASHINFER_SAMPLER: "0", HF_HUB_OFFLINE: "1"}}
"""


def wait_health(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return
        except OSError:
            time.sleep(2)
    raise SystemExit(f"not ready: {url}")


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def complete(base: str, model: str, prompt: str, max_tokens: int = 4) -> tuple[str, float]:
    """(engine header, client TTFT) of a streamed completion."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True}).encode()
    req = urllib.request.Request(
        f"{base}/v1/completions", body, {"content-type": "application/json"}, method="POST"
    )
    start = time.perf_counter()
    ttft = None
    with urllib.request.urlopen(req, timeout=120) as resp:
        engine = resp.headers.get("x-kvstack-engine", "")
        for raw in resp:
            if ttft is None and raw.startswith(b"data: {"):
                ttft = time.perf_counter() - start
    return engine, ttft or 0.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = Path("/tmp/lora-logs")
    logs.mkdir(exist_ok=True)
    for i, name in enumerate(("sql", "chat", "c3", "c4", "late")):
        write_adapter(Path(f"/tmp/adapters/{name}"), seed=i)
    # `kvstack engine serve` runs `vllm`: the image has the package in /tmp/site, not the script
    vllm = Path("/tmp/bin/vllm")
    vllm.parent.mkdir(exist_ok=True)
    vllm.write_text(
        "#!/bin/bash\nexec python3 -c 'import sys; from vllm.entrypoints.cli.main import main; "
        'sys.argv[0] = "vllm"; sys.exit(main())\' "$@"\n'
    )
    vllm.chmod(0o755)
    os.environ["PATH"] = f"{vllm.parent}:{os.environ['PATH']}"

    from kvstack.common.lora import LoraClient
    from kvstack.router.discovery.static import sim_engine_entry

    kvstack = [sys.executable, "-m", "kvstack"]
    procs: list[subprocess.Popen[bytes]] = []
    engines = [f"http://127.0.0.1:{8200 + i}" for i in range(2)]
    checks: dict[str, Any] = {}
    try:
        for i in range(2):
            cfg = logs / f"engine{i}.yaml"
            cfg.write_text(engine_yaml(i))
            log = open(logs / f"engine{i}.log", "wb")  # noqa: SIM115 - lives as long as the engine
            procs.append(
                subprocess.Popen([*kvstack, "engine", "serve", "--config", str(cfg)], stdout=log, stderr=log)
            )
            if i == 0:  # the second engine starts once the first sized its KV cache (none profiles another)
                sized = time.monotonic() + 240
                while time.monotonic() < sized:
                    text = (logs / "engine0.log").read_text(errors="replace")
                    if "KV cache size" in text or "Available KV cache memory" in text:
                        break
                    time.sleep(1)
        for url in engines:
            wait_health(url, 600)

        async def load() -> None:
            client = LoraClient()
            try:
                await client.load(engines[0], "sql", "/tmp/adapters/sql")
                for url in engines:
                    await client.load(url, "chat", "/tmp/adapters/chat")
                for name in ("c3", "c4"):
                    await client.load(engines[1], name, f"/tmp/adapters/{name}")
                checks["loaded"] = {url: [a.name for a in await client.loaded(url)] for url in engines}
            finally:
                await client.aclose()

        asyncio.run(load())
        entries = [
            sim_engine_entry(f"gpu{i}", http=8200 + i, kv_events=5657 + 2 * i, kv_replay=5658 + 2 * i)
            for i in range(len(engines))
        ]
        (logs / "engines.yaml").write_text(json.dumps(entries) + "\n")  # JSON is YAML
        router = "http://127.0.0.1:8300"
        env = {
            **os.environ,
            "KVSTACK_ROUTER_EXPOSE_ENGINE_HEADER": "true",
            "KVSTACK_ROUTER_TOKENIZER": "engine",
            # declared, on no engine yet: a request for it is held while the router loads it
            "KVSTACK_ROUTER_ADAPTERS": json.dumps(
                [{"name": "late", "model": SERVED, "source": "/tmp/adapters/late"}]
            ),
        }
        rlog = open(logs / "router.log", "wb")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [
                    *kvstack,
                    "router",
                    "--port",
                    "8300",
                    "--engines-file",
                    str(logs / "engines.yaml"),
                    "--policy",
                    "cache_aware",
                    "--log-level",
                    "info",
                ],
                env=env,
                stdout=rlog,
                stderr=rlog,
            )
        )
        wait_health(router, 60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ids = {m["id"] for m in json.load(urllib.request.urlopen(f"{router}/v1/models"))["data"]}
            if {"sql", "chat"} <= ids:
                break
            time.sleep(1)

        # 1. an adapter goes only where it is loaded
        landed = [complete(router, "sql", f"Short question number {n} about tables?")[0] for n in range(8)]
        checks["sql_only_on_gpu0"] = {"engines": landed, "ok": set(landed) == {"gpu0"}}

        # 2. the same prompt under two adapters on one engine never shares KV (straight to gpu0)
        prompt = " ".join(f"row{n} col{n % 7} value{n * 13 % 101}" for n in range(600))

        def hits_on(url: str, model: str) -> float:
            before = metric(url, "vllm:prefix_cache_hits_total")
            complete(url, model, prompt)
            return metric(url, "vllm:prefix_cache_hits_total") - before

        direct = {
            "sql_cold": hits_on(engines[0], "sql"),
            "chat_same_prompt": hits_on(engines[0], "chat"),
            "base_same_prompt": hits_on(engines[0], SERVED),
            "sql_again": hits_on(engines[0], "sql"),
        }
        checks["kv_scoped_by_adapter"] = {
            **direct,
            "ok": direct["chat_same_prompt"] == 0
            and direct["base_same_prompt"] == 0
            and direct["sql_again"] > 0,
        }

        # 3. through the router: predicted hits per request equal the engines' hits (within a block)
        time.sleep(3)  # past the router's speculative entries: only the engines' events count now
        rows = []
        other = " ".join(f"item{n} tag{n % 5}" for n in range(500))
        for model, text in (
            ("chat", other),
            ("chat", other),
            ("sql", other),
            ("sql", other),
            ("chat", other),
        ):
            pred0 = metric(router, "kvstack_router_predicted_hit_tokens_total")
            eng0 = sum(metric(u, "vllm:prefix_cache_hits_total") for u in engines)
            engine, _ = complete(router, model, text)
            time.sleep(1)  # the KV events of this request reach the router before the next one
            rows.append(
                {
                    "model": model,
                    "engine": engine,
                    "predicted": metric(router, "kvstack_router_predicted_hit_tokens_total") - pred0,
                    "engine_hits": sum(metric(u, "vllm:prefix_cache_hits_total") for u in engines) - eng0,
                }
            )
        checks["predicted_vs_engine"] = {
            "rows": rows,
            "ok": all(abs(r["predicted"] - r["engine_hits"]) <= 16 for r in rows)
            and rows[2]["predicted"] == 0  # sql's first look at chat's prompt: nothing of its own
            and rows[1]["predicted"] > 0,
        }

        # 4. a declared adapter that no engine holds: the request waits while the router loads it
        engine, ttft = complete(router, "late", "A question for the late adapter?")
        holders = []

        async def holders_of_late() -> None:
            client = LoraClient()
            try:
                for url in engines:
                    if "late" in [a.name for a in await client.loaded(url)]:
                        holders.append(url)
            finally:
                await client.aclose()

        asyncio.run(holders_of_late())
        checks["held_then_loaded"] = {
            "engine": engine,
            "ttft_s": ttft,
            "holders": holders,
            "ok": bool(engine) and ttft > 0 and len(holders) >= 1,
        }

        # 5. the swap cost: gpu1 holds chat, c3, c4 with two GPU slots
        short = [f"ping {n}" for n in range(30)]
        one = [complete(engines[1], "chat", s, 1)[1] for s in short]
        cycle = [complete(engines[1], ("chat", "c3", "c4")[n % 3], s, 1)[1] for n, s in enumerate(short)]
        checks["swap_cost_s"] = {
            "one_adapter_ttft_p50": statistics.median(one),
            "cycling_three_ttft_p50": statistics.median(cycle),
            "estimate": statistics.median(cycle) - statistics.median(one),
            "ok": True,  # a measurement, not a check: set latency.lora_swap_s from it
        }
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs.glob("*.log"):
            (out / f.name).write_bytes(f.read_bytes()[-200_000:])
    ok = all(c.get("ok", True) for c in checks.values() if isinstance(c, dict))
    (out / "lora_proof.json").write_text(json.dumps({"ok": ok, "checks": checks}, indent=1))
    print(json.dumps({"ok": ok, "checks": checks}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
