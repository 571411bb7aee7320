"""read_yaml_file and read_config_file: a file that cannot be used fails with one clear ConfigError."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvstack.common.config import ConfigError, read_config_file, read_yaml_file


@pytest.mark.parametrize(
    ("content", "data"),
    [
        (b"port: 8000\n", {"port": 8000}),
        (b'{"port": 8000}', {"port": 8000}),  # JSON is YAML
        (b"- http://a:8000\n- http://b:8000\n", ["http://a:8000", "http://b:8000"]),
        (b"", None),
    ],
)
def test_read_yaml_file(tmp_path: Path, content: bytes, data: Any) -> None:
    path = tmp_path / "f.yaml"
    path.write_bytes(content)
    assert read_yaml_file(path, "engines file") == data


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"cannot read engines file .*f\.yaml: .*No such file"),
        (b"port: [8000\n", r"cannot read engines file .*f\.yaml: "),
        (b"\xff\xfe\x00port", r"cannot read engines file .*f\.yaml: .*codec can't decode"),
    ],
)
def test_an_unreadable_file_names_what_it_is(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "f.yaml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        read_yaml_file(path, "engines file")


@pytest.mark.parametrize(
    ("content", "outcome"),
    [
        (b"port: 8000\n", {"port": 8000}),
        (b"", {}),
        (b"# only a comment\n", {}),
        (b"- a\n", "must hold a mapping, not list"),
        (b"8000\n", "must hold a mapping, not int"),
        (b"\xff", "cannot read config file"),
    ],
)
def test_read_config_file_wants_a_mapping(
    tmp_path: Path, content: bytes, outcome: dict[str, Any] | str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    if isinstance(outcome, dict):
        assert read_config_file(path) == outcome
    else:
        with pytest.raises(ConfigError, match=outcome):
            read_config_file(path)
