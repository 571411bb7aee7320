"""A model's chat template, found and rendered the way transformers' ``apply_chat_template`` does.

The template is ``tokenizer_config.json``'s ``chat_template`` (the ``default`` of named ones) or
``chat_template.jinja``; it is compiled in a sandboxed jinja2 environment with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, the ``tojson`` filter and the ``raise_exception`` and
``strftime_now`` globals, as transformers compiles it. Messages reach it as vLLM 0.24 hands them to
a string-content template: a content array as its text parts joined with newlines.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvstack.router.prompts import message_text

TEMPLATE_FILE = "chat_template.jinja"


def chat_template_of(config: Mapping[str, Any], model_dir: Path) -> str | None:
    """The model's chat template: the config's (the ``default`` of named ones), or the .jinja file."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    path = model_dir / TEMPLATE_FILE
    return path.read_text() if path.is_file() else None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_template(source: str) -> Callable[..., str]:
    """The template as transformers compiles chat templates (same environment, filters, globals)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    template = env.from_string(source)
    return template.render


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as vLLM hands them to a string-content template: content arrays as their joined text."""
    out: list[dict[str, Any]] = []
    for m in messages:
        content = m.get("content")
        out.append(dict(m) if not isinstance(content, list) else {**m, "content": message_text(content)})
    return out
