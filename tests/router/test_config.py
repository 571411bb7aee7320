"""Router settings: precedence (flags > env > file > defaults) and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstack.common.config import ConfigError
from kvstack.router.app import build_context
from kvstack.router.config import load_settings


def test_defaults() -> None:
    settings = load_settings()
    assert (settings.port, settings.policy, settings.upstream_backend) == (8000, "least_loaded", "aiohttp")
    assert settings.api_keys == []


def test_precedence_flags_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "router.yaml"
    cfg.write_text("port: 9001\npolicy: session\nmax_attempts: 5\nmonitor:\n  probe_interval: 0.5\n")
    assert load_settings(cfg).port == 9001
    monkeypatch.setenv("KVSTACK_ROUTER_PORT", "9002")
    monkeypatch.setenv("KVSTACK_ROUTER_ENGINES", "http://a:1, http://b:2/")
    monkeypatch.setenv("KVSTACK_ROUTER_MONITOR__SCRAPE_INTERVAL", "0.25")
    settings = load_settings(cfg)
    assert settings.port == 9002 and settings.policy == "session" and settings.max_attempts == 5
    assert settings.engines == ["http://a:1", "http://b:2"]
    assert settings.monitor.probe_interval == 0.5 and settings.monitor.scrape_interval == 0.25
    assert load_settings(cfg, port=9003, policy=None).port == 9003


def test_api_keys_from_env_are_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTACK_ROUTER_API_KEYS", "sk-one,sk-two")
    settings = load_settings()
    assert [k.get_secret_value() for k in settings.api_keys] == ["sk-one", "sk-two"]
    assert "sk-one" not in repr(settings)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"port": 70000}, "port"),
        ({"engines": ["10.0.0.1:8000"]}, "engines"),
        ({"upstream_backend": "curl"}, "upstream_backend"),
        ({"connect_timeout_s": 0}, "connect_timeout_s"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"eject_failure_rate": 1.5}, "eject_failure_rate"),
        ({"max_ejected_percent": -1}, "max_ejected_percent"),
        ({"eject_duration_s": 60, "eject_max_duration_s": 30}, "eject_max_duration_s must be at least"),
        ({"tokenize_defer_max_chars": -1}, "tokenize_defer_max_chars"),
        ({"rate_limit_burst": 5}, "rate_limit_burst needs rate_limit_rps"),
        ({"api_keys_file": "/nonexistent/keys"}, "api_keys_file"),
        ({"no_such_setting": 1}, "no_such_setting"),
    ],
)
def test_bad_values_fail_naming_the_field(values: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_settings(**values)


def test_bad_field_in_file_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "router.yaml"
    cfg.write_text("monitor:\n  probe_interval: -1\n")
    with pytest.raises(ConfigError, match=r"monitor\.probe_interval"):
        load_settings(cfg)


def test_unknown_policy_fails_at_start() -> None:
    with pytest.raises(ConfigError, match="policy"):
        build_context(load_settings(policy="fastest"))


def test_cli_exits_2_naming_the_bad_field() -> None:
    import subprocess
    import sys

    kvstack = str(Path(sys.executable).with_name("kvstack"))
    done = subprocess.run(
        [kvstack, "router", "--port", "70000"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert "port" in done.stderr and "70000" in done.stderr


def test_policy_settings_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "router.yaml"
    cfg.write_text(
        "policy: cache_aware\ncache_aware:\n  decision:\n    load_factor: 1.5\n"
        "  index:\n    cpu_weight: 0.5\nprefix_trie:\n  chunk_chars: 64\n"
    )
    monkeypatch.setenv("KVSTACK_ROUTER_CACHE_AWARE__DECISION__EXPLORE_RATE", "0")
    monkeypatch.setenv("KVSTACK_ROUTER_PREFIX_TRIE__MAX_NODES", "1000")
    settings = load_settings(cfg)
    assert settings.cache_aware.decision.load_factor == 1.5
    assert settings.cache_aware.decision.explore_rate == 0.0
    assert settings.cache_aware.index.cpu_weight == 0.5
    assert (settings.prefix_trie.chunk_chars, settings.prefix_trie.max_nodes) == (64, 1000)
    # the built policies take their settings from the router's configuration
    ctx = build_context(settings)
    assert ctx.policy.settings.load_factor == 1.5  # type: ignore[attr-defined]
    assert ctx.policy.index.settings.cpu_weight == 0.5  # type: ignore[attr-defined]
    trie = build_context(load_settings(cfg, policy="prefix_trie")).policy
    assert (trie.name, trie.trie.chunk, trie.trie.max_nodes) == ("prefix_trie", 64, 1000)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"cache_aware": {"decision": {"load_factor": 0.5}}}, r"cache_aware\.decision\.load_factor"),
        ({"cache_aware": {"index": {"no_such": 1}}}, r"cache_aware\.index\.no_such"),
        ({"cache_aware": {"events": {"replay_timeout_s": 0}}}, r"cache_aware\.events\.replay_timeout_s"),
        ({"prefix_trie": {"chunk_chars": 0}}, r"prefix_trie\.chunk_chars"),
        ({"expose_engine_header": "maybe"}, "expose_engine_header"),
    ],
)
def test_bad_policy_settings_are_named(values: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_settings(**values)


def test_every_policy_name_builds() -> None:
    from kvstack.router.policies import policy_names

    assert {"cache_aware", "prefix_trie", "least_loaded"} <= set(policy_names())
    for name in policy_names():
        assert build_context(load_settings(policy=name)).policy.name == name


def test_cache_aware_follows_the_routers_own_registry() -> None:
    # An empty registry once read as "none given" and the policy followed a private one: it never
    # subscribed to any engine's KV events.
    ctx = build_context(load_settings(policy="cache_aware"))
    assert len(ctx.registry) == 0
    assert ctx.policy.registry is ctx.registry  # type: ignore[attr-defined]
