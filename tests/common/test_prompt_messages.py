"""The Responses and Messages APIs' prompts as chat messages (what the router keys, what the
simulator prefills): table-driven."""

from __future__ import annotations

from typing import Any

import pytest

from kvstack.common.errors import OpenAIError
from kvstack.common.prompt_messages import (
    anthropic_messages,
    check_anthropic_messages,
    check_responses_input,
    responses_messages,
)


@pytest.mark.parametrize(
    ("value", "instructions", "messages"),
    [
        ("hi", None, [{"role": "user", "content": "hi"}]),
        ("hi", "be brief", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
                },
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "c"}]},
            ],
            "",
            [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c"}],
        ),
        ([{"type": "function_call_output", "call_id": "1", "output": "x"}], None, None),
        ([{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}], None, None),
    ],
)
def test_responses_messages(
    value: Any, instructions: str | None, messages: list[dict[str, str]] | None
) -> None:
    check_responses_input(value)
    assert responses_messages(value, instructions) == messages


@pytest.mark.parametrize(
    "value", [None, 3, [], ["x"], [{"content": "no role or type"}], [{"role": "user", "content": 5}]]
)
def test_bad_input(value: Any) -> None:
    with pytest.raises(OpenAIError) as err:
        check_responses_input(value)
    assert (err.value.status, err.value.param) == (400, "input")


@pytest.mark.parametrize(
    ("messages", "system", "expected"),
    [
        ([{"role": "user", "content": "hi"}], None, [{"role": "user", "content": "hi"}]),
        (
            [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            [{"type": "text", "text": "be brief"}],
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}],
        ),
        ([{"role": "user", "content": "hi"}], "", [{"role": "user", "content": "hi"}]),
        ([{"role": "user", "content": [{"type": "image", "source": {}}]}], None, None),
        ([{"role": "user", "content": "hi"}], [{"type": "tool_result", "content": "x"}], None),
    ],
)
def test_anthropic_messages(messages: Any, system: Any, expected: list[dict[str, str]] | None) -> None:
    check_anthropic_messages(messages, system)
    assert anthropic_messages(messages, system) == expected


@pytest.mark.parametrize(
    ("messages", "system", "param"),
    [
        (None, None, "messages"),
        ([], None, "messages"),
        ([{"role": "system", "content": "x"}], None, "messages"),
        ([{"role": "user", "content": 3}], None, "messages"),
        ([{"role": "user", "content": [{"text": "untyped"}]}], None, "messages"),
        ([{"role": "user", "content": "x"}], 5, "system"),
    ],
)
def test_bad_anthropic_messages(messages: Any, system: Any, param: str) -> None:
    with pytest.raises(OpenAIError) as err:
        check_anthropic_messages(messages, system)
    assert (err.value.status, err.value.param) == (400, param)
