"""LoRA in ``kvstack engine serve``: the flags, the runtime-loading switch, the checks."""

from __future__ import annotations

from typing import Any

import pytest

from kvstack.common.config import ConfigError, build
from kvstack.engine.serve.config import EngineConfig, load_config
from kvstack.engine.serve.render import LaunchSpec, render


def spec(**values: Any) -> LaunchSpec:
    return render(build(EngineConfig, "engine config", **{"model": "org/model", **values}))


def test_no_lora_section_renders_nothing_of_lora() -> None:
    launched = spec()
    assert not [a for a in launched.argv if "lora" in a]
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in launched.env


def test_lora_renders_enable_limits_and_runtime_updating() -> None:
    launched = spec(
        lora={"max_loras": 4, "max_lora_rank": 64, "max_cpu_loras": 12}, extra_args=["--seed", "1"]
    )
    tail = launched.argv[launched.argv.index("--enable-lora") :]
    assert tail == [
        "--enable-lora", "--max-loras", "4", "--max-lora-rank", "64", "--max-cpu-loras", "12", "--seed", "1",
    ]  # fmt: skip
    assert launched.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_lora_defaults_are_vllms() -> None:
    launched = spec(lora={})
    assert launched.argv[-5:] == ["--enable-lora", "--max-loras", "1", "--max-lora-rank", "16"]


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"lora": {"max_lora_rank": 24}}, "lora.max_lora_rank"),
        ({"lora": {"max_loras": 4, "max_cpu_loras": 2}}, "maxCpuLoras (2) must be at least maxLoras (4)"),
        ({"lora": {"max_loras": 0}}, "lora.max_loras"),
        ({"extra_args": ["--max-loras", "8"]}, "sets flags kvstack manages: --max-loras"),
        ({"extra_args": ["--enable-lora"]}, "sets flags kvstack manages: --enable-lora"),
        ({"extra_env": {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}}, "VLLM_ALLOW_RUNTIME_LORA_UPDATING"),
    ],
)
def test_bad_lora_settings_name_the_field(values: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as err:
        build(EngineConfig, "engine config", model="org/model", **values)
    assert says in str(err.value)


def test_lora_from_file_and_environment(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "engine.yaml"
    path.write_text("model: org/model\nlora:\n  max_loras: 2\n  max_lora_rank: 32\n")
    monkeypatch.setenv("KVSTACK_ENGINE_LORA__MAX_LORAS", "3")
    config = load_config(path)
    assert config.lora is not None
    assert (config.lora.max_loras, config.lora.max_lora_rank) == (3, 32)
