"""build_layered: defaults < file < environment < flags, one rule for every process's settings."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kvstack.common.config import ConfigError, build_layered


class _Section(BaseModel):
    url: str = "default-url"
    size: int = 1


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KVSTACK_TEST_LAYERS_", env_nested_delimiter="__", extra="forbid"
    )

    name: str = "default"
    port: int = Field(80, ge=1)
    section: _Section = _Section()


@pytest.mark.parametrize(
    ("file_values", "env", "flags", "expected"),
    [
        ({}, {}, {}, ("default", 80)),
        ({"name": "file"}, {}, {}, ("file", 80)),
        ({"name": "file"}, {"NAME": "env"}, {}, ("env", 80)),
        ({"name": "file"}, {"NAME": "env"}, {"name": "flag"}, ("flag", 80)),
        ({"name": "file"}, {}, {"name": "flag"}, ("flag", 80)),
        ({}, {"PORT": "81"}, {"port": 82}, ("default", 82)),
        ({"port": 90}, {}, {"port": None}, ("default", 90)),  # a flag left None was not given
        ({"port": 90}, {"PORT": "91"}, {"name": None, "port": None}, ("default", 91)),
    ],
)
def test_precedence(
    monkeypatch: pytest.MonkeyPatch,
    file_values: dict[str, Any],
    env: dict[str, str],
    flags: dict[str, Any],
    expected: tuple[str, int],
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(f"KVSTACK_TEST_LAYERS_{key}", value)
    got = build_layered(_Settings, "test settings", file_values=file_values, flags=flags)
    assert (got.name, got.port) == expected
    assert type(got) is _Settings
    assert got == _Settings.model_construct(name=expected[0], port=expected[1])


def test_a_section_merges_key_by_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTACK_TEST_LAYERS_SECTION__URL", "env-url")
    got = build_layered(
        _Settings, "test settings", file_values={"section": {"url": "file-url", "size": 5}}, flags={}
    )
    assert got.section == _Section(url="env-url", size=5)


@pytest.mark.parametrize(
    ("file_values", "env", "flags", "message"),
    [
        ({"port": 0}, {}, {}, r"invalid test settings: port: Input should be greater than or equal to 1"),
        ({}, {"PORT": "x"}, {}, r"port: Input should be a valid integer"),
        ({}, {}, {"port": -1}, r"port: Input should be greater than or equal to 1"),
        ({"nmae": "typo"}, {}, {}, r"nmae: Extra inputs are not permitted"),
        ({"section": {"size": "big"}}, {}, {}, r"section\.size: Input should be a valid integer"),
    ],
)
def test_a_bad_value_from_any_layer_names_its_field(
    monkeypatch: pytest.MonkeyPatch,
    file_values: dict[str, Any],
    env: dict[str, str],
    flags: dict[str, Any],
    message: str,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(f"KVSTACK_TEST_LAYERS_{key}", value)
    with pytest.raises(ConfigError, match=message):
        build_layered(_Settings, "test settings", file_values=file_values, flags=flags)
