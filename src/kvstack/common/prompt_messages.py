"""The prompt of a Responses API request, or of an Anthropic Messages API one, as chat messages.

One conversion per API, shared: the simulator prefills exactly these messages under its chat
template, and the router keys them for cache-aware routing the way it keys a chat, so a conversation
sent through ``/v1/responses`` or ``/v1/messages`` lands where its earlier turns are cached. Only
messages of text carry what the router can key; a request with other items (function calls, images,
tool results) still goes to the engine, routed by model and load.
"""

from __future__ import annotations

from typing import Any

from kvstack.common.errors import OpenAIError

# content part types whose text is the message's (vLLM joins them as a chat's text parts)
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


def check_responses_input(value: Any) -> None:
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


def responses_messages(value: Any, instructions: Any = None) -> list[dict[str, str]] | None:
    """``[{"role", "content"}]``: the instructions as a system message, then the input's messages;
    None when an item is not a message of text (``value`` was checked by :func:`check_responses_input`)."""
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


# ---------------------------------------------------------------- Anthropic Messages API


def check_anthropic_messages(value: Any, system: Any) -> None:
    """``messages``: a non-empty array of ``{"role": "user"|"assistant", "content": string or
    blocks}``, each block an object with a string ``type``; ``system``: a string or blocks. A 400
    naming the field otherwise."""
    if not isinstance(value, list) or not value:
        raise OpenAIError(400, "'messages' must be a non-empty array", param="messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise OpenAIError(400, f"'messages[{i}].role' must be 'user' or 'assistant'", param="messages")
        _check_blocks(message.get("content"), f"messages[{i}].content", "messages")
    if system is not None:
        _check_blocks(system, "system", "system")


def _check_blocks(content: Any, where: str, param: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list) or not all(
        isinstance(b, dict) and isinstance(b.get("type"), str) for b in content
    ):
        raise OpenAIError(400, f"'{where}' must be a string or an array of typed blocks", param=param)


def _block_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    texts = [b.get("text") for b in content]
    if any(b.get("type") != "text" for b in content) or not all(isinstance(t, str) for t in texts):
        return None  # an image, a tool call or its result: not text the router can key
    return "\n".join(texts)


def anthropic_messages(value: Any, system: Any = None) -> list[dict[str, str]] | None:
    """``[{"role", "content"}]``: the system prompt as a system message, then the messages; None
    when a block is not text (``value`` was checked by :func:`check_anthropic_messages`)."""
    messages: list[dict[str, str]] = []
    if system is not None:
        text = _block_text(system)
        if text is None:
            return None
        if text:
            messages.append({"role": "system", "content": text})
    for message in value:
        text = _block_text(message["content"])
        if text is None:
            return None
        messages.append({"role": message["role"], "content": text})
    return messages
