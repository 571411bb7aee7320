"""comma_list and split_comma_list: the one parser of comma-separated lists (env vars, annotations)."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from pydantic import field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kvstack.common.config import ConfigError, build, comma_list, split_comma_list


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("", []),
        ("   ", []),
        (",", []),
        (" , ,, ", []),
        ("a", ["a"]),
        ("a,b,c", ["a", "b", "c"]),
        (" a , b ", ["a", "b"]),
        ("a,,b,", ["a", "b"]),
        (",a", ["a"]),
        ("a\t,\nb", ["a", "b"]),
        ("a b, c", ["a b", "c"]),  # only commas separate
        ("a,a", ["a", "a"]),  # order and repeats are kept: callers decide what a repeat means
        ("http://e1:8000,http://e2:8000", ["http://e1:8000", "http://e2:8000"]),
    ],
)
def test_comma_list(text: str, items: list[str]) -> None:
    assert comma_list(text) == items


@pytest.mark.parametrize(
    ("value", "out"),
    [
        ("a, b", ["a", "b"]),
        ("", []),
        (["a", " b "], ["a", " b "]),  # a list from a file or flags is the field's to validate
        ([], []),
        (None, None),
        (3, 3),
    ],
)
def test_split_comma_list_only_splits_strings(value: Any, out: Any) -> None:
    assert split_comma_list(value) == out


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KVSTACK_TEST_LISTS_", extra="forbid")

    names: Annotated[list[str], NoDecode] = []
    _split = field_validator("names", mode="before")(split_comma_list)


def test_a_settings_list_reads_the_environment_as_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTACK_TEST_LISTS_NAMES", "llama, qwen,")
    assert build(_Settings, "test settings").names == ["llama", "qwen"]


def test_a_bad_list_still_fails_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"names\.0"):
        build(_Settings, "test settings", names=[1.5])
