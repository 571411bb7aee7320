"""scripts/gpu/device.sh writes each engine's `kvstack engine serve` config on the GPU machine; a config
that `engine serve` refuses costs a whole device call there (every engine waits out its start timeout),
so every variant it can write is validated here with --dry-run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvstack.bench.gpu_plan import text_salt

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts/gpu/device.sh"


def functions(*names: str) -> str:
    """A command printing the script's functions ``names`` (the script itself installs a wheel first)."""
    return "sed -n " + " ".join(f'-e "/^{n}()/,/^}}/p"' for n in names) + f" {SCRIPT}"


def engine_yaml(index: int, env: dict[str, str]) -> str:
    """The script's own engine_yaml function, run alone (the script itself installs a wheel first)."""
    body = f"source <({functions('engine_yaml')}); engine_yaml {index}"
    return subprocess.run(
        ["bash", "-c", body], env={**os.environ, **env}, check=True, capture_output=True, text=True
    ).stdout


@pytest.mark.parametrize(
    "env",
    [
        {"LMCACHE": "1", "GPU_UTIL": "0.3", "REDIS_PORT": "6390", "LMCACHE_CPU_GB": "20"},
        {"LMCACHE": "0", "GPU_UTIL": "0.15"},
        {
            "LMCACHE": "1",
            "GPU_UTIL": "0.15",
            "REDIS_PORT": "6390",
            "LMCACHE_CPU_GB": "10",
            "ENGINE_ARGS": "--enforce-eager",
        },
        {"LMCACHE": "0", "GPU_UTIL": "0.2", "ENGINE_ARGS": '--max-num-seqs, "64"'},
        {"LMCACHE": "1", "GPU_UTIL": "0.2", "REDIS_PORT": "6390", "LMCACHE_CPU_GB": "20", "DEV_MODE": "0"},
    ],
)
@pytest.mark.parametrize("index", [0, 3])
def test_engine_serve_accepts_every_config_device_sh_writes(
    tmp_path: Path, env: dict[str, str], index: int
) -> None:
    config = tmp_path / "engine.yaml"
    config.write_text(engine_yaml(index, env))
    done = subprocess.run(
        [sys.executable, "-m", "kvstack", "engine", "serve", "--config", str(config), "--dry-run"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert f"--port {8100 + index}" in done.stdout or f"--port' '{8100 + index}" in done.stdout
    assert ("LMCacheConnectorV1" in done.stdout) == (env["LMCACHE"] == "1")
    # the matrix resets the engines' prefix caches between cases: dev mode unless turned off
    assert ("VLLM_SERVER_DEV_MODE" in done.stdout) == (env.get("DEV_MODE", "1") == "1")
    # and empties LMCache's CPU tiers through its internal API, each engine on its own ports
    api = f"LMCACHE_INTERNAL_API_SERVER_PORT_START={7000 + 10 * index}"
    assert (api in done.stdout.replace("'", "")) == (env["LMCACHE"] == "1")


def run_matrix(tmp_path: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The script's matrix function, run alone over an engines file of four engines."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "engines.yaml").write_text(
        "".join(
            f'- {{url: "http://127.0.0.1:{8100 + i}", name: gpu{i}, models: [kvstack-8b]}}\n'
            for i in range(4)
        )
    )
    body = f'source <({functions("matrix", "names_tokenizer", "bundle_traces", "engines_file")}); matrix "$@"'
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # python3 -m kvstack: this venv's
    full = {**os.environ, "PATH": path, "LOGS": str(logs), "REDIS_PORT": "6390", "OUT": str(tmp_path), **env}
    return subprocess.run(["bash", "-c", body, "matrix", *args], env=full, capture_output=True, text=True)


ISSUE_MATRIX = [
    *("--engines-subset", "2", "--engines-subset", "4", "--workload", "multi_round_qa"),
    *("--load", "0.3", "--load", "1.2", "--runs", "2", "--policy", "cache_aware"),
    *("--policy", "sglang_cache_aware", "--policy", "sglang_round_robin"),
]


def test_matrix_dry_run_prints_the_plan_and_its_estimate(tmp_path: Path) -> None:
    done = run_matrix(tmp_path, [*ISSUE_MATRIX, "--duration-s", "4"], {"MATRIX_DRY_RUN": "1", "TRACE": "t"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("plan: 24 cases, estimated ")
    assert lines[1].startswith("  e2-multi_round_qa-l0.3-cache_aware-r1: seed ")
    assert f"(trace same/t/e2/load0.3/run1, prompts start {text_salt('cache_aware')})" in lines[1]
    assert lines[-1].startswith("  e4-multi_round_qa-l1.2-cache_aware-r2: seed ")  # rotated: last in run 2


def test_matrix_over_its_budget_is_refused_before_any_request(tmp_path: Path) -> None:
    done = run_matrix(tmp_path, [*ISSUE_MATRIX, "--duration-s", "60"], {})
    assert "over --budget-s 560" in done.stdout
    assert "requests ..." not in done.stdout  # no case started


def printed_argv(tmp_path: Path, names: tuple[str, ...], *args: str) -> list[str]:
    """The command line the script's function ``names[0]`` (with the functions it calls, the rest of
    ``names``) runs under ``timeout``, which echoes it instead."""
    body = (
        f"source <({functions(*names)}); set -u; LOGS=/tmp/gpulogs; OUT={tmp_path}; REDIS_PORT=6390; "
        f'timeout() {{ shift; printf "%s\\n" "$@"; }}; {names[0]} "$@"'
    )
    done = subprocess.run(
        ["bash", "-c", body, names[0], *args], check=True, capture_output=True, text=True, env=os.environ
    )
    return done.stdout.splitlines()


def flow_argv(tmp_path: Path, *args: str) -> list[str]:
    """The `kvstack bench flow` command line the script's flow function runs."""
    return printed_argv(tmp_path, ("flow", "names_tokenizer", "engines_file"), *args)


@pytest.mark.parametrize(
    ("args", "tokenizer"),
    [
        ((), ["--tokenizer", "engine"]),  # the default: the engines' /tokenize
        (("--policy", "cache_aware+flow"), ["--tokenizer", "engine"]),
        (("--tokenizer", "local", "--tokenizer-path", "/tmp/model"), ["--tokenizer", "local"]),
        (("--tokenizer=builtin",), ["--tokenizer=builtin"]),
    ],
)
def test_flow_passes_the_caller_s_tokenizer_else_the_engines(
    tmp_path: Path, args: tuple[str, ...], tokenizer: list[str]
) -> None:
    argv = flow_argv(tmp_path, *args)
    assert argv[:4] == ["python3", "-m", "kvstack", "bench"]
    assert sum(1 for a in argv if a.startswith("--tokenizer") and a != "--tokenizer-path") == 1
    at = next(i for i, a in enumerate(argv) if a.startswith("--tokenizer") and a != "--tokenizer-path")
    assert argv[at : at + len(tokenizer)] == tokenizer
    assert argv[-len(args) :] == list(args) if args else argv[-2:] == ["--out", str(tmp_path)]
    assert (tmp_path / "flow.log").exists()  # its output is kept beside the results
    # LMCache's shared tier is flushed before every case (as the matrix does)
    assert argv[argv.index("--redis-url") + 1] == "redis://127.0.0.1:6390"


def test_flow_and_matrix_clear_the_lmcache_apis_that_answer(tmp_path: Path) -> None:
    """Engine 0's internal API answers (a listening socket at its worker port), engine 1's does not:
    only engine 0's is passed, and the script says why engine 1's is not."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        env = {**os.environ, "LMCACHE_API_PORT": str(port - 1), "ENGINES": "2", "LMCACHE": "1"}
        body = f"source <({functions('lmcache_api_args')}); lmcache_api_args"
        done = subprocess.run(["bash", "-c", body], env=env, capture_output=True, text=True, check=True)
        assert done.stdout.splitlines() == ["--lmcache-api", f"http://127.0.0.1:{port}"]
        assert f"engine 1 (port {port + 10}) does not answer" in done.stderr
        off = subprocess.run(
            ["bash", "-c", body], env={**env, "CLEAR_LMCACHE": "0"}, capture_output=True, text=True
        )
        assert off.stdout == ""
        names = ("flow", "names_tokenizer", "engines_file", "lmcache_api_args")
        body = (
            f"source <({functions(*names)}); set -u; LOGS=/tmp/gpulogs; OUT={tmp_path}; REDIS_PORT=6390; "
            'timeout() { shift; printf "%s\\n" "$@"; }; flow'
        )
        argv = subprocess.run(["bash", "-c", body], env=env, capture_output=True, text=True, check=True)
        lines = argv.stdout.splitlines()
        assert lines[lines.index("--lmcache-api") + 1] == f"http://127.0.0.1:{port}"


def test_the_traces_go_back_as_one_archive_beside_the_results(tmp_path: Path) -> None:
    """A run call returns at most 8 files from $OUT: 18 per-case traces once crowded out the
    matrix's JSON, PNG and log. The script's bundle_traces leaves those and one archive."""
    names = [f"m-e2-l{load}-{p}-r{r}.trace.jsonl" for load in (0.3, 0.9, 1.3) for p in "abc" for r in (1, 2)]
    for name in names:
        (tmp_path / name).write_text(name)
    for kept in ("m-e2.json", "m-e2.png", "matrix.log"):
        (tmp_path / kept).write_text(kept)
    body = f"source <({functions('bundle_traces')}); bundle_traces"
    subprocess.run(["bash", "-c", body], env={**os.environ, "OUT": str(tmp_path)}, check=True)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in left if not n.startswith("traces-")] == ["m-e2.json", "m-e2.png", "matrix.log"]
    (archive,) = [n for n in left if n.startswith("traces-")]
    listed = subprocess.run(
        ["tar", "tzf", str(tmp_path / archive)], check=True, capture_output=True, text=True
    )
    assert sorted(listed.stdout.split()) == sorted(names)
    # nothing to bundle: nothing written
    subprocess.run(["bash", "-c", body], env={**os.environ, "OUT": str(tmp_path)}, check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == left


@pytest.mark.parametrize(
    ("args", "tokenizer"),
    [
        # the default: the model's own files, no /tokenize round trip per request (r13: 15-25 ms)
        ((), ["--tokenizer", "local", "--tokenizer-path", "/tmp/model"]),
        (("--tokenizer", "engine"), ["--tokenizer", "engine"]),
        (("--tokenizer=builtin",), ["--tokenizer=builtin"]),
    ],
)
def test_the_matrix_tokenizes_in_the_router_unless_told_otherwise(
    tmp_path: Path, args: tuple[str, ...], tokenizer: list[str]
) -> None:
    argv = printed_argv(tmp_path, ("matrix", "names_tokenizer", "bundle_traces"), *args)
    assert argv[:5] == ["python3", "-m", "kvstack", "bench", "gpu"]
    chosen = [i for i, a in enumerate(argv) if a.startswith("--tokenizer") and a != "--tokenizer-path"]
    assert len(chosen) == 1
    assert argv[chosen[0] : chosen[0] + len(tokenizer)] == tokenizer
    assert (tmp_path / "matrix.log").exists()


@pytest.mark.parametrize(("shared", "device"), [(None, True), ("1", True), ("0", False)])
def test_shared_device_0_gives_the_router_the_engines_without_their_device(
    tmp_path: Path, shared: str | None, device: bool
) -> None:
    """The A/B of bench-results/lmcache section 16 over one start of the engines: the same engines,
    told or not told that they share the GPU."""
    line = '- {url: "http://127.0.0.1:810%d", name: gpu%d, kv_events_endpoint: "tcp://x", device: gpu-0}\n'
    (tmp_path / "engines.yaml").write_text(line % (0, 0) + line % (1, 1))
    env = {**os.environ, "LOGS": str(tmp_path)}
    env.pop("SHARED_DEVICE", None)
    if shared is not None:
        env["SHARED_DEVICE"] = shared
    body = f"source <({functions('engines_file')}); engines_file"
    done = subprocess.run(["bash", "-c", body], env=env, check=True, capture_output=True, text=True)
    path = done.stdout.strip()
    entries = yaml.safe_load(Path(path).read_text())
    assert [e["name"] for e in entries] == ["gpu0", "gpu1"]
    assert all(e["kv_events_endpoint"] == "tcp://x" for e in entries)
    assert all(("device" in e) == device for e in entries)


def test_lmcache_full_tells_evictions_from_failed_stores(tmp_path: Path) -> None:
    """The check `flow` and `matrix` print after a run. LMCache 0.5.3 logs "Failed to allocate" on
    every allocation that finds its CPU buffer full, evicting after it (the store goes on); only
    "choosing to store only" (KV dropped) and "No eviction candidates found" (waits) are stores
    failing, and only they ask for a restart."""
    full = "LMCache WARNING: Failed to allocate memory block of size 33554432 because no memory\n"
    cut = "LMCache WARNING: Local cpu memory under pressure so choosing to store only  3 total chunks\n"
    wait = "LMCache WARNING: No eviction candidates found in local cpu backend.\n"
    stored = "INFO Stored 256 out of total 256 tokens\n"
    (tmp_path / "engine0.log").write_text("INFO ready\n" + full * 3 + stored)
    (tmp_path / "engine1.log").write_text("INFO ready\n" + full + cut * 2 + wait)
    (tmp_path / "engine2.log").write_text("INFO ready\n" + stored)
    (tmp_path / "engine.yaml").write_text("not a log\n")
    body = f"source <({functions('lmcache_full')}); lmcache_full {tmp_path}"
    out = subprocess.run(["bash", "-c", body], check=True, capture_output=True, text=True).stdout
    counts = "CPU buffer full at {} allocations (evicting), {} stores cut short, {} waits for an evictable"
    counts += " chunk"
    assert out.splitlines() == [
        "engine0: " + counts.format(3, 0, 0),
        "engine1: " + counts.format(1, 2, 1) + " (stores are failing: restart for clean figures)",
        "engine2: " + counts.format(0, 0, 0),
    ]


@pytest.mark.parametrize(("memory_mib", "engines", "util"), [("143771", "4", "0.2"), ("81559", "2", "0.45")])
def test_engines_auto_sizes_the_engines_to_the_card(
    tmp_path: Path, memory_mib: str, engines: str, util: str
) -> None:
    """A lease asked for either card gets whichever starts: four engines on an H200, two on an H100."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\necho {memory_mib}\n")
    fake.chmod(0o755)
    body = f'source <({functions("size_to_card")}); unset GPU_UTIL; size_to_card; echo "$ENGINES $GPU_UTIL"'
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", body], env=env, check=True, capture_output=True, text=True)
    assert done.stdout.split() == [engines, util]
