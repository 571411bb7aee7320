"""Flags we manage (pure decisions) and the masked --dry-run views."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable

import pytest

from kvstack.engine.serve.display import MASK, mask_url_password, masked_env, to_json, to_shell
from kvstack.engine.serve.managed import colliding_env, colliding_flags, flag_name, secret_flags
from kvstack.engine.serve.render import LaunchSpec


@pytest.mark.parametrize(
    ("arg", "name"),
    [
        ("--port", "--port"),
        ("--port=8000", "--port"),
        ("--max_model_len", "--max-model-len"),
        ("--kv-transfer-config.kv_role=kv_both", "--kv-transfer-config"),
        ("-tp", "--tensor-parallel-size"),
        ("-O", "-O"),
        ("8000", None),
        ("-1", None),
        ("-0.5", None),
        ("-", None),
        ('{"a":1}', None),
    ],
)
def test_flag_name(arg: str, name: str | None) -> None:
    assert flag_name(arg) == name


@pytest.mark.parametrize(
    ("args", "clash"),
    [
        ([], []),
        (["--max-num-seqs", "64", "--enable-chunked-prefill"], []),
        (["--port", "1", "--port", "1"], ["--port"]),
        (["--host=::", "--block_size", "32"], ["--host=::", "--block_size"]),
        (
            ["--kv-events-config", "{}", "--served-model-name", "x"],
            ["--kv-events-config", "--served-model-name"],
        ),
        (["--model", "x"], ["--model"]),
        (
            ["--gpu-memory-utilization", "0.5", "--max-model-len", "1"],
            ["--gpu-memory-utilization", "--max-model-len"],
        ),
        (["--enable-prefix-caching"], ["--enable-prefix-caching"]),
        (["--api-key", "k"], []),  # a secret flag, rejected on its own terms
    ],
)
def test_colliding_flags(args: list[str], clash: list[str]) -> None:
    assert colliding_flags(args) == clash


@pytest.mark.parametrize(
    ("args", "found"),
    [
        (["--api-key", "k"], ["--api-key"]),
        (["--api_key=k", "--hf-token", "t", "--api-key", "k"], ["--api-key", "--hf-token"]),
        (["--max-num-seqs", "1"], []),
    ],
)
def test_secret_flags(args: list[str], found: list[str]) -> None:
    assert secret_flags(args) == found


def test_colliding_env() -> None:
    assert colliding_env(["HF_HOME", "VLLM_API_KEY", "LMCACHE_REMOTE_URL", "LMCACHE_LOG_LEVEL"]) == [
        "LMCACHE_REMOTE_URL",
        "VLLM_API_KEY",
    ]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:pw@redis:6379/0", f"redis://user:{MASK}@redis:6379/0"),
        ("redis://:pw@redis:6379", f"redis://:{MASK}@redis:6379"),
        (
            "redis-sentinel://u:p@h1:26379,h2:26379/mymaster",
            f"redis-sentinel://u:{MASK}@h1:26379,h2:26379/mymaster",
        ),
        ("redis://user@redis:6379", "redis://user@redis:6379"),
        ("lm://cache:65432", "lm://cache:65432"),
        ("plain text", "plain text"),
    ],
)
def test_mask_url_password(url: str, shown: str) -> None:
    assert mask_url_password(url) == shown


SPEC = LaunchSpec(
    argv=["vllm", "serve", "m", "--port", "8000", "--kv-transfer-config", '{"a":"b c"}', "--x", "-1"],
    env={
        "AWS_SECRET_ACCESS_KEY": "aws-s3cret",
        "HF_HOME": "/m",
        "HF_TOKEN": "hf_s3cret",
        "LMCACHE_REMOTE_URL": "rediss://u:redis-s3cret@r:6380",
        "VLLM_API_KEY": "sk-s3cret",
    },
    secret_env=frozenset({"VLLM_API_KEY"}),
)


def test_masked_env_hides_every_secret() -> None:
    env = masked_env(SPEC)
    assert env["HF_HOME"] == "/m"
    assert env["VLLM_API_KEY"] == env["HF_TOKEN"] == env["AWS_SECRET_ACCESS_KEY"] == MASK
    assert env["LMCACHE_REMOTE_URL"] == f"rediss://u:{MASK}@r:6380"


@pytest.mark.parametrize("render", [to_shell, to_json])
def test_views_never_show_a_secret(render: Callable[[LaunchSpec], str]) -> None:
    assert "s3cret" not in render(SPEC)


def test_shell_view_is_a_script_that_reproduces_the_command() -> None:
    text = to_shell(SPEC)
    lines = text.replace("\\\n", " ").splitlines()
    exports = [line for line in lines if line.startswith("export ")]
    assert [e.split("=", 1)[0] for e in exports] == [f"export {k}" for k in SPEC.env]
    (command,) = [line for line in lines if line.startswith("exec ")]
    assert shlex.split(command)[1:] == SPEC.argv
    # one flag per line, with its value beside it; a negative number stays a value
    assert "    --x -1" in text.splitlines()


def test_json_view() -> None:
    data = json.loads(to_json(SPEC))
    assert data["argv"] == SPEC.argv
    assert data["masked"] == ["AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "LMCACHE_REMOTE_URL", "VLLM_API_KEY"]
    assert data["env"]["HF_HOME"] == "/m"
