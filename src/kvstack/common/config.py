"""Typed configuration helpers: load pydantic settings and fail with one message naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """Configuration that cannot be used; the message names the offending field."""


def describe_validation_error(err: ValidationError, *, prefix: str = "") -> str:
    """One line per problem: ``field.path: message (got value)``."""
    lines = []
    for problem in err.errors(include_url=False):
        loc = ".".join(str(part) for part in problem["loc"])
        got = problem.get("input")
        # Never echo a mapping (it may hold secrets) or a secret itself back to the user.
        hidden = isinstance(got, dict | SecretStr) or problem["type"] == "missing"
        shown = "" if hidden else f" (got {got!r})"
        msg = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{prefix}{loc}: {msg}{shown}" if loc else f"{prefix}{msg}")
    return "; ".join(lines)


def build(model: type[M], source: str, /, **values: Any) -> M:
    """Construct ``model`` (settings read the environment too), turning errors into ConfigError."""
    try:
        return model(**values)
    except ValidationError as err:
        raise ConfigError(f"invalid {source}: {describe_validation_error(err)}") from err


def comma_list(text: str) -> list[str]:
    """The items of a comma-separated list, stripped, empty ones dropped: ``" a, b,,c"`` -> a, b, c."""
    return [item for part in text.split(",") if (item := part.strip())]


def split_comma_list(value: Any) -> Any:
    """For a list field's ``mode="before"`` validator: the environment's ``"a,b"`` becomes a list.

    Anything else (a list from a file or flags) is left for the field's own validation.
    """
    return comma_list(value) if isinstance(value, str) else value


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML or JSON mapping from ``path`` (JSON is YAML)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data
