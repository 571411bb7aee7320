"""A Responses API request's ``input`` (and ``instructions``) as chat messages.

One conversion, shared: the simulator prefills exactly these messages under its chat template, and
the router keys them for cache-aware routing the way it keys a chat, so a conversation sent through
``/v1/responses`` lands where its earlier turns are cached. Only message items carry text the router
can key; a request with other items (function calls, reasoning) still goes to the engine, routed by
model and load.
"""

from __future__ import annotations

from typing import Any

from kvstack.common.errors import OpenAIError

# content part types whose text is the message's (vLLM joins them as a chat's text parts)
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


def check_input(value: Any) -> None:
    """``input``: a string, or a non-empty array of objects each with a string ``type`` or ``role``;
    a 400 naming ``input`` otherwise."""
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not value:
        raise OpenAIError(400, "'input' must be a string or a non-empty array of items", param="input")
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not (
            isinstance(item.get("type"), str) or isinstance(item.get("role"), str)
        ):
            raise OpenAIError(
                400, f"'input[{i}]' must be an object with a string 'type' or 'role'", param="input"
            )
        content = item.get("content")
        if "role" in item and content is not None and not isinstance(content, str | list):
            raise OpenAIError(400, f"'input[{i}].content' must be a string or an array", param="input")


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    texts: list[str] = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
            return None  # an image or a file: not text the router can key
        text = part.get("text")
        if not isinstance(text, str):
            return None
        texts.append(text)
    return "\n".join(texts)


def input_messages(value: Any, instructions: Any = None) -> list[dict[str, str]] | None:
    """``[{"role", "content"}]``: the instructions as a system message, then the input's messages;
    None when an item is not a message of text (``value`` was checked by :func:`check_input`)."""
    messages: list[dict[str, str]] = []
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
        return messages
    for item in value:
        role = item.get("role")
        if not isinstance(role, str) or item.get("type", "message") != "message":
            return None
        text = _text(item.get("content"))
        if text is None:
            return None
        messages.append({"role": role, "content": text})
    return messages
