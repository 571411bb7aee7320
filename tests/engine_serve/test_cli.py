"""``kvstack engine serve`` as a pod runs it: a real subprocess of the installed console script."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

SYSTEM_PATH = "/usr/bin:/bin"


@pytest.fixture(scope="module")
def kvstack_bin(repo_root: Path) -> Path:
    path = repo_root / ".venv" / "bin" / "kvstack"
    if not path.exists():
        pytest.fail(f"{path} missing: run `make venv`")
    return path


def run(
    kvstack_bin: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    base = {"PATH": SYSTEM_PATH, "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
    return subprocess.run(
        [str(kvstack_bin), "engine", "serve", *args],
        env={**base, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_dry_run_prints_a_masked_shell_script(kvstack_bin: Path) -> None:
    out = run(
        kvstack_bin,
        "--dry-run",
        env={
            "KVSTACK_ENGINE_MODEL": "meta-llama/Llama-3.1-8B-Instruct",
            "KVSTACK_ENGINE_API_KEY": "sk-very-secret",
            "KVSTACK_ENGINE_LMCACHE__REMOTE_URL": "redis://:redispw@redis:6379",
        },
    )
    assert out.returncode == 0, out.stderr
    assert "sk-very-secret" not in out.stdout and "redispw" not in out.stdout
    assert "export VLLM_API_KEY='**********'" in out.stdout
    assert "export LMCACHE_REMOTE_URL='redis://:**********@redis:6379'" in out.stdout
    assert "exec vllm serve meta-llama/Llama-3.1-8B-Instruct" in out.stdout


def test_dry_run_json_with_file_and_env(kvstack_bin: Path, tmp_path: Path) -> None:
    path = tmp_path / "engine.yaml"
    path.write_text("model: org/m\nport: 9000\nkv_events:\n  enabled: true\n  topic: from-file\n")
    out = run(
        kvstack_bin,
        "--config",
        str(path),
        "--dry-run",
        "--format",
        "json",
        env={"KVSTACK_ENGINE_PORT": "9100", "KVSTACK_ENGINE_EXTRA_ARGS": "--max-num-seqs 32"},
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    argv = data["argv"]
    assert argv[:3] == ["vllm", "serve", "org/m"]
    assert argv[argv.index("--port") + 1] == "9100"
    assert json.loads(argv[argv.index("--kv-events-config") + 1])["topic"] == "from-file"
    assert argv[-2:] == ["--max-num-seqs", "32"]
    assert data["env"]["PYTHONHASHSEED"] == "0"
    assert data["masked"] == []


@pytest.mark.parametrize(
    ("env", "field"),
    [
        (
            {"KVSTACK_ENGINE_MODEL": "m", "KVSTACK_ENGINE_GPU_MEMORY_UTILIZATION": "1.5"},
            "gpu_memory_utilization",
        ),
        ({"KVSTACK_ENGINE_MODEL": "m", "KVSTACK_ENGINE_BLOCK_SIZE": "24"}, "block_size"),
        ({"KVSTACK_ENGINE_MODEL": "m", "KVSTACK_ENGINE_LMCACHE__CHUNK_SIZE": "100"}, "lmcache"),
        ({"KVSTACK_ENGINE_MODEL": "m", "KVSTACK_ENGINE_EXTRA_ARGS": "--port 1"}, "extra_args"),
        ({"KVSTACK_ENGINE_MODEL": "m", "KVSTACK_ENGINE_PROT": "1"}, "KVSTACK_ENGINE_PROT"),
        ({}, "model"),
    ],
)
def test_bad_config_exits_2_naming_the_field(kvstack_bin: Path, env: dict[str, str], field: str) -> None:
    out = run(kvstack_bin, "--dry-run", env=env)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.startswith("error: invalid engine config")
    assert field in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_config_file_exits_2(kvstack_bin: Path, tmp_path: Path) -> None:
    out = run(kvstack_bin, "--config", str(tmp_path / "nope.yaml"), env={"KVSTACK_ENGINE_MODEL": "m"})
    assert out.returncode == 2
    assert "cannot read config file" in out.stderr


def test_missing_vllm_binary_fails_clearly(kvstack_bin: Path, tmp_path: Path) -> None:
    out = run(kvstack_bin, env={"KVSTACK_ENGINE_MODEL": "m", "PATH": str(tmp_path)})
    assert out.returncode == 127
    assert "cannot run 'vllm': not found on PATH" in out.stderr
    assert "vllm==0.24.0" in out.stderr


def _write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_a_binary_that_cannot_start_fails_clearly(kvstack_bin: Path, tmp_path: Path) -> None:
    _write_executable(tmp_path / "vllm", "#!/nonexistent/interpreter\n")
    out = run(kvstack_bin, env={"KVSTACK_ENGINE_MODEL": "m", "PATH": f"{tmp_path}:{SYSTEM_PATH}"})
    assert out.returncode == 126
    assert f"cannot run {tmp_path / 'vllm'}" in out.stderr


def test_serve_execs_vllm_with_the_rendered_argv_and_env(kvstack_bin: Path, tmp_path: Path) -> None:
    # vLLM cannot run without a GPU; a stand-in on PATH records how it was started.
    record = tmp_path / "record"
    _write_executable(
        tmp_path / "vllm",
        f'#!/bin/sh\necho "$$" > {record}.pid\nprintf "%s\\n" "$@" > {record}.argv\nenv > {record}.env\n',
    )
    proc = subprocess.Popen(
        [str(kvstack_bin), "engine", "serve"],
        env={
            "PATH": f"{tmp_path}:{SYSTEM_PATH}",
            "HOME": str(tmp_path),
            "KVSTACK_ENGINE_MODEL": "org/m",
            "KVSTACK_ENGINE_API_KEY": "sk-live",
            "KVSTACK_ENGINE_EXTRA_ENV": '{"HF_HOME": "/models"}',
            "PYTHONHASHSEED": "123",
            "LMCACHE_PIN_TIMEOUT_SEC": "300",  # what the config renders: no warning
            "TMPDIR": str(tmp_path),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    # exec, not a child: vLLM keeps kvstack's PID, so it gets the kubelet's SIGTERM itself
    assert int((tmp_path / "record.pid").read_text()) == proc.pid
    argv = (tmp_path / "record.argv").read_text().splitlines()
    assert argv[:2] == ["serve", "org/m"]
    assert "--kv-transfer-config" in argv
    assert not any("sk-live" in arg for arg in argv)
    env = dict(
        line.split("=", 1) for line in (tmp_path / "record.env").read_text().splitlines() if "=" in line
    )
    assert env["VLLM_API_KEY"] == "sk-live"
    assert env["PYTHONHASHSEED"] == "0"
    assert "warning: the pod's PYTHONHASHSEED is replaced" in stderr
    assert "LMCACHE_PIN_TIMEOUT_SEC" not in stderr
    assert env["HF_HOME"] == "/models"
    assert env["LMCACHE_TRACK_USAGE"] == "false"
    assert not any(k.startswith("KVSTACK_ENGINE_") for k in env)
    # LMCache on: vLLM's /metrics collects every process's series from a folder made for this start
    metrics = Path(env["PROMETHEUS_MULTIPROC_DIR"])
    assert metrics.parent == tmp_path and metrics.is_dir() and not any(metrics.iterdir())
