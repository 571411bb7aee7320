"""Typed configuration helpers: load pydantic settings and fail with one message naming the field."""

from __future__ import annotations

import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource

M = TypeVar("M", bound=BaseModel)
S = TypeVar("S", bound=BaseSettings)


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


def build_layered(
    model: type[S], source: str, *, file_values: Mapping[str, Any], flags: Mapping[str, Any]
) -> S:
    """``model`` from its defaults < ``file_values`` < its environment variables < ``flags``.

    Flags left None were not given and are dropped. Nested sections merge key by key, so one
    environment variable replaces one key of a file's section. ConfigError names a bad field.
    """
    values = dict(file_values)
    given = {k: v for k, v in flags.items() if v is not None}

    def sources(
        cls: type[BaseSettings],
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The flags arrive as init arguments; the file is a source of its own, below the environment.
        return init_settings, env_settings, InitSettingsSource(settings_cls, values)

    hook = {"settings_customise_sources": classmethod(sources)}
    layered = types.new_class(model.__name__, (model,), exec_body=lambda ns: ns.update(hook))
    read = build(cast(type[S], layered), source, **given)
    # Hand back the model's own class (equal to one built directly), with the values just validated.
    fields = {name: getattr(read, name) for name in type(read).model_fields}
    return cast(S, model.model_construct(_fields_set=read.model_fields_set, **fields))


def comma_list(text: str) -> list[str]:
    """The items of a comma-separated list, stripped, empty ones dropped: ``" a, b,,c"`` -> a, b, c."""
    return [item for part in text.split(",") if (item := part.strip())]


def split_comma_list(value: Any) -> Any:
    """For a list field's ``mode="before"`` validator: the environment's ``"a,b"`` becomes a list.

    Anything else (a list from a file or flags) is left for the field's own validation.
    """
    return comma_list(value) if isinstance(value, str) else value


def read_yaml_file(path: Path, what: str) -> Any:
    """The YAML (or JSON: JSON is YAML) document in ``path``; ConfigError naming ``what`` it is."""
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {what} {path}: {_one_line(err)}") from err


def _one_line(err: Exception) -> str:
    """The reason alone: an OSError's text without its errno, a YAML error's problem and position
    (PyYAML's own message spans lines, quoting the document's context)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(err).split())


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML or JSON mapping from ``path``."""
    data = read_yaml_file(path, "config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data
