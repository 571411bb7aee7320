"""EngineConfig: defaults, sources and their precedence, and one clear error per bad field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvstack.common.config import ConfigError, build
from kvstack.engine.serve.config import EngineConfig, load_config, unknown_env_vars


def make(**values: Any) -> EngineConfig:
    return build(EngineConfig, "engine config", **{"model": "m", **values})


def test_defaults_match_the_reference_launch() -> None:
    cfg = make()
    assert (cfg.host, cfg.port, cfg.tensor_parallel_size, cfg.block_size) == ("0.0.0.0", 8000, 1, 16)
    assert cfg.gpu_memory_utilization == 0.9
    assert cfg.max_model_len is None and cfg.api_key is None
    assert cfg.enable_prefix_caching is True
    assert cfg.python_hash_seed == "0"
    assert cfg.kv_events.enabled is False
    assert (cfg.kv_events.endpoint, cfg.kv_events.replay_endpoint, cfg.kv_events.topic) == (
        "tcp://*:5557",
        "tcp://*:5558",
        "kv-events",
    )
    lm = cfg.lmcache
    assert (lm.enabled, lm.chunk_size, lm.local_cpu, lm.max_local_cpu_size) == (True, 256, True, 5.0)
    assert (lm.local_disk, lm.max_local_disk_size, lm.remote_url) == (None, 0.0, None)
    assert (lm.remote_serde, lm.save_decode_cache) == ("naive", False)


@pytest.mark.parametrize(
    ("values", "field", "expected"),
    [
        ({"served_model_name": "a, b"}, "served_model_name", ["a", "b"]),
        ({"served_model_name": ["a"]}, "served_model_name", ["a"]),
        (
            {"extra_args": "--max-num-seqs 64 --foo 'a b'"},
            "extra_args",
            ["--max-num-seqs", "64", "--foo", "a b"],
        ),
        ({"extra_args": '["--x", "1"]'}, "extra_args", ["--x", "1"]),
        ({"extra_env": '{"HF_HOME": "/m"}'}, "extra_env", {"HF_HOME": "/m"}),
        ({"extra_env": {"HF_HUB_OFFLINE": 1}}, "extra_env", {"HF_HUB_OFFLINE": "1"}),
        ({"python_hash_seed": 42}, "python_hash_seed", "42"),
        ({"python_hash_seed": "random"}, "python_hash_seed", "random"),
        ({"max_model_len": ""}, "max_model_len", None),
        ({"block_size": "32"}, "block_size", 32),
    ],
)
def test_values_are_parsed_from_env_and_file_forms(values: dict[str, Any], field: str, expected: Any) -> None:
    assert getattr(make(**values), field) == expected


@pytest.mark.parametrize(
    ("values", "names"),
    [
        ({"model": ""}, "model"),
        ({"port": 0}, "port"),
        ({"port": "http"}, "port"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"max_model_len": -1}, "max_model_len"),
        ({"gpu_memory_utilization": 0}, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": 1.01}, "gpu_memory_utilization"),
        ({"block_size": 24}, "block_size"),
        ({"block_size": 512}, "block_size"),
        ({"enable_prefix_caching": False, "kv_events": {"enabled": True}}, "enable_prefix_caching"),
        ({"kv_events": {"endpoint": "localhost:5557"}}, "kv_events.endpoint"),
        ({"kv_events": {"replay_endpoint": "http://x"}}, "kv_events.replay_endpoint"),
        ({"kv_events": {"enabld": True}}, "kv_events.enabld"),
        ({"block_size": 32, "lmcache": {"chunk_size": 48}}, "lmcache.chunk_size"),
        ({"lmcache": {"chunk_size": 0}}, "lmcache.chunk_size"),
        ({"lmcache": {"max_local_cpu_size": 0}}, "lmcache.max_local_cpu_size"),
        ({"lmcache": {"pin_timeout_sec": 0}}, "lmcache.pin_timeout_sec"),
        ({"lmcache": {"local_disk": "/cache"}}, "max_local_disk_size"),
        ({"lmcache": {"remote_url": "http://redis:6379"}}, "remote_url"),
        ({"lmcache": {"remote_url": "redis://"}}, "remote_url"),
        ({"lmcache": {"remote_serde": "pickle"}}, "lmcache.remote_serde"),
        ({"lmcache": {"remote_url": "redis://r:6379"}, "python_hash_seed": "random"}, "python_hash_seed"),
        ({"python_hash_seed": "-1"}, "python_hash_seed"),
        ({"python_hash_seed": "4294967296"}, "python_hash_seed"),
        ({"extra_args": ["--port", "9000"]}, "--port"),
        ({"extra_args": ["--kv-transfer-config={}"]}, "--kv-transfer-config={}"),
        ({"extra_args": ["--kv_events_config.topic=x"]}, "--kv_events_config.topic=x"),
        ({"extra_args": ["-tp", "2"]}, "-tp"),
        ({"extra_args": ["--no-enable-prefix-caching"]}, "--no-enable-prefix-caching"),
        ({"extra_args": "['--x'"}, "extra_args"),
        ({"extra_env": {"PYTHONHASHSEED": "1"}}, "PYTHONHASHSEED"),
        ({"extra_env": {"LMCACHE_CONFIG_FILE": "/x.yaml"}}, "LMCACHE_CONFIG_FILE"),
        ({"extra_env": {"VLLM_SERVER_DEV_MODE": "1"}}, "VLLM_SERVER_DEV_MODE"),
        ({"extra_env": {"1BAD": "x"}}, "1BAD"),
        ({"extra_env": "{not json"}, "extra_env"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_values_fail_naming_the_field(values: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigError) as err:
        make(**values)
    assert names in str(err.value)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--api-key", "sk-live-123"], "--api-key"),
        (["--hf-token=hf_live_123"], "--hf-token"),
        (["--port", "1", "--api_key", "sk-live-123"], "--api-key"),
        ("--max-num-seqs 8 --api-key sk-live-123", "--api-key"),
        ('["--hf_token", "hf_live_123"', "--hf-token"),
    ],
)
def test_secrets_on_the_command_line_are_rejected_without_echoing_them(
    args: list[str] | str, flag: str
) -> None:
    with pytest.raises(ConfigError) as err:
        make(extra_args=args)
    assert flag in str(err.value)
    assert "live_123" not in str(err.value) and "live-123" not in str(err.value)


def test_a_bad_remote_url_error_never_echoes_its_password() -> None:
    with pytest.raises(ConfigError) as err:
        make(lmcache={"remote_url": "redis2://user:hunter2@redis:6379"})
    assert "remote_url" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_api_key_is_a_secret_in_repr_and_dump() -> None:
    cfg = make(api_key="sk-abc")
    assert "sk-abc" not in repr(cfg)
    assert "sk-abc" not in str(cfg.model_dump())
    assert cfg.api_key is not None and cfg.api_key.get_secret_value() == "sk-abc"


def test_environment_overrides_file_overrides_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "engine.yaml"
    path.write_text(
        "model: from-file\nport: 9000\nmax_model_len: 4096\n"
        "lmcache:\n  remote_url: redis://file:6379\n  chunk_size: 512\n"
    )
    monkeypatch.setenv("KVSTACK_ENGINE_PORT", "9100")
    monkeypatch.setenv("KVSTACK_ENGINE_LMCACHE__REMOTE_URL", "redis://env:6379")
    cfg = load_config(path)
    assert cfg.model == "from-file"  # file over default (there is none)
    assert cfg.port == 9100  # env over file
    assert cfg.max_model_len == 4096  # file over default
    # nested sections merge key by key: env replaces one key, the file keeps the rest
    assert cfg.lmcache.remote_url == "redis://env:6379"
    assert cfg.lmcache.chunk_size == 512
    assert cfg.gpu_memory_utilization == 0.9  # default


def test_environment_alone_is_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTACK_ENGINE_MODEL", "env-model")
    monkeypatch.setenv("KVSTACK_ENGINE_KV_EVENTS__ENABLED", "true")
    monkeypatch.setenv("KVSTACK_ENGINE_KV_EVENTS__REPLAY_ENDPOINT", "")
    cfg = load_config(None)
    assert cfg.model == "env-model"
    assert cfg.kv_events.enabled is True
    assert cfg.kv_events.replay_endpoint is None


def test_missing_model_names_it() -> None:
    with pytest.raises(ConfigError, match="model: Field required"):
        load_config(None)


@pytest.mark.parametrize(
    ("text", "message"),
    [("- a\n- b\n", "must hold a mapping"), ("model: [unclosed\n", "cannot read config file")],
)
def test_bad_files_fail_clearly(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "engine.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


@pytest.mark.parametrize(
    ("environ", "unknown"),
    [
        ({"KVSTACK_ENGINE_MODEL": "m", "KVSTACK_ENGINE_LMCACHE__CHUNK_SIZE": "256"}, []),
        ({"KVSTACK_ENGINE_MODLE": "m"}, ["KVSTACK_ENGINE_MODLE"]),
        ({"kvstack_engine_port": "1"}, []),
        ({"KVSTACK_ENGINE_EXTRA_ENV__HF_HOME": "/m"}, ["KVSTACK_ENGINE_EXTRA_ENV__HF_HOME"]),
        ({"KVSTACK_ENGINE_PORT__X": "1"}, ["KVSTACK_ENGINE_PORT__X"]),
        ({"KVSTACK_ROUTER_PORT": "1", "PATH": "/bin"}, []),
    ],
)
def test_unknown_env_vars(environ: dict[str, str], unknown: list[str]) -> None:
    assert unknown_env_vars(environ) == unknown


def test_a_typo_in_an_env_var_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTACK_ENGINE_MODEL", "m")
    monkeypatch.setenv("KVSTACK_ENGINE_GPU_MEMORY_UTILISATION", "0.5")
    with pytest.raises(ConfigError, match="KVSTACK_ENGINE_GPU_MEMORY_UTILISATION"):
        load_config(None)


@pytest.mark.parametrize(
    "raw",
    [
        '{"HF_TOKEN": "hf_live_123", "PYTHONHASHSEED": "1"}',
        '{"HF_TOKEN": "hf_live_123",}',
        '["HF_TOKEN", "hf_live_123"]',
    ],
)
def test_bad_extra_env_errors_never_echo_its_values(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("KVSTACK_ENGINE_MODEL", "m")
    monkeypatch.setenv("KVSTACK_ENGINE_EXTRA_ENV", raw)
    with pytest.raises(ConfigError, match="extra_env") as err:
        load_config(None)
    assert "live_123" not in str(err.value)


def test_unbalanced_shell_quotes_in_extra_args_name_the_field() -> None:
    with pytest.raises(ConfigError, match="extra_args: cannot parse: No closing quotation"):
        make(extra_args="--chat-template 'unclosed")
