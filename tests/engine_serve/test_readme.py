"""engine/README.md documents every config field, with its env var name and its default."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from kvstack.engine.serve.config import ENV_PREFIX, EngineConfig


def _leaves(model: type[BaseModel], prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out += _leaves(info.annotation, f"{prefix}{name}.")
        else:
            out.append((prefix + name, info.default))
    return out


def _table_rows(repo_root: Path) -> dict[str, list[str]]:
    rows = {}
    for line in (repo_root / "engine" / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    return rows


@pytest.mark.parametrize(("key", "default"), _leaves(EngineConfig))
def test_every_field_is_in_the_table(repo_root: Path, key: str, default: object) -> None:
    rows = _table_rows(repo_root)
    assert key in rows, f"engine/README.md lacks a row for {key}"
    env = ENV_PREFIX + key.upper().replace(".", "__")
    assert rows[key][1] == f"`{env}`"
    if isinstance(default, bool):
        assert f"`{str(default).lower()}`" in rows[key][2]
    elif isinstance(default, int | float | str):
        assert f"`{default}`" in rows[key][2] or f'`"{default}"`' in rows[key][2]


def test_the_table_has_no_stale_rows(repo_root: Path) -> None:
    assert set(_table_rows(repo_root)) == {key for key, _ in _leaves(EngineConfig)}
