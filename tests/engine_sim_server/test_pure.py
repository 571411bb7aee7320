"""Table tests of the server's pure parts: length check, stop strings, frames, buckets, settings."""

from __future__ import annotations

import json
from collections import deque

import pytest

from kvstack.common.errors import OpenAIError
from kvstack.common.tokenizer import VOCAB_SIZE, encode
from kvstack.engine.sim import protocol as p
from kvstack.engine.sim.cli_settings import split_settings
from kvstack.engine.sim.events import replay_slice
from kvstack.engine.sim.metric_shapes import buckets_1_2_5


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "is_text", "expect"),
    [
        (10, 5, True, 5),
        (10, None, True, 90),  # no max_tokens: the rest of the context
        (95, 5, False, 5),  # exactly full
        (96, 5, False, "prompt contains 96 input tokens, for a total of 101 tokens"),
        (200, 5, True, "prompt contains at least 96 input tokens, for a total of at least 101 tokens"),
        (100, None, False, "you requested 0 output tokens and your prompt contains 100 input tokens"),
        (1, 100, False, "for a total of 101 tokens"),
    ],
)
def test_check_length(prompt_len: int, max_tokens: int | None, is_text: bool, expect: int | str) -> None:
    if isinstance(expect, int):
        assert p.check_length(prompt_len, max_tokens, 100, is_text=is_text) == expect
        return
    with pytest.raises(OpenAIError) as err:
        p.check_length(prompt_len, max_tokens, 100, is_text=is_text)
    assert err.value.status == 400
    assert err.value.param == "input_tokens"
    assert err.value.message.startswith("This model's maximum context length is 100 tokens. However, ")
    assert expect in err.value.message


@pytest.mark.parametrize(
    ("stops", "include", "deltas", "released", "reason"),
    [
        (("END",), False, ["abc", "dEN", "Dxyz"], "abcd", "END"),
        (("END",), True, ["abc", "dEN", "Dxyz"], "abcdEND", "END"),
        (("x", "bc"), False, ["abcx"], "a", "bc"),  # the earliest match wins
        (("zz",), False, ["abc", "def"], "abcdef", None),  # flush releases the held tail
        (("\n\n",), False, ["line\n", "\nnext"], "line", "\n\n"),
    ],
)
def test_stop_matcher(
    stops: tuple[str, ...], include: bool, deltas: list[str], released: str, reason: str | None
) -> None:
    m = p.StopMatcher(stops, include)
    out = ""
    for d in deltas:
        out += m.feed(d)
        if m.stop_reason is not None:
            break
    if m.stop_reason is None:
        out += m.flush()
    assert out == released
    assert m.stop_reason == reason


def test_stop_matcher_never_releases_a_stop_prefix_early() -> None:
    m = p.StopMatcher(("STOP",))
    assert m.feed("abcST") == "ab"  # "cST" could still become "STOP"
    assert m.feed("O") == "c"
    assert m.feed("Px") == ""
    assert m.stop_reason == "STOP"


@pytest.mark.parametrize(
    ("prompt", "ids", "is_text"),
    [
        ("hello world", encode("hello world"), True),
        ([1, 2, 300], [1, 2, 300], False),
        (["hello"], encode("hello"), True),
        ([[5, 6]], [5, 6], False),
    ],
)
def test_completion_prompt_ids(
    prompt: str | list[int] | list[str] | list[list[int]], ids: list[int], is_text: bool
) -> None:
    assert p.completion_prompt_ids(prompt) == (ids, is_text)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "cannot be empty"),
        ([], "cannot be empty"),
        ([VOCAB_SIZE], "out of vocabulary"),
        (["a", "b"], "one prompt"),
    ],
)
def test_completion_prompt_rejects(prompt: str | list[int] | list[str], message: str) -> None:
    with pytest.raises(OpenAIError) as err:
        p.completion_prompt_ids(prompt)
    assert err.value.status == 400
    assert message in err.value.message


@pytest.mark.parametrize("chat", [True, False])
def test_chunk_frames_are_json(chat: bool) -> None:
    w = p.ChunkWriter(chat=chat, request_id="r-1", model='m"x', created=7)
    frames = [
        w.text_frame('a "quoted"\n text'),
        w.final_frame("end", "stop", "END"),
        w.usage_frame(p.Usage(3, 2, 1)),
    ]
    if chat:
        frames.insert(0, w.role_frame())
    docs = []
    for frame in frames:
        assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
        docs.append(json.loads(frame[6:]))
    assert all(d["id"] == "r-1" and d["model"] == 'm"x' and d["created"] == 7 for d in docs)
    body = docs[-3]["choices"][0]
    assert (body["delta"]["content"] if chat else body["text"]) == 'a "quoted"\n text'
    assert docs[-2]["choices"][0]["finish_reason"] == "stop"
    assert docs[-2]["choices"][0]["stop_reason"] == "END"
    assert docs[-1]["choices"] == []
    assert docs[-1]["usage"] == {
        "prompt_tokens": 3,
        "total_tokens": 5,
        "completion_tokens": 2,
        "prompt_tokens_details": {"cached_tokens": 1},
    }
    if chat:
        assert docs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert docs[0]["object"] == "chat.completion.chunk"


def test_detokenizer_keeps_split_characters_whole() -> None:
    ids = list("é!".encode())  # byte-fallback ids: 0xC3 0xA9 0x21
    detok = p.Detokenizer()
    assert detok(ids[:1]) == ""
    assert detok(ids[1:]) == "é!"
    assert detok.flush() == ""


@pytest.mark.parametrize(
    ("limit", "expect"),
    [
        (1, [1.0]),
        (9, [1.0, 2.0, 5.0]),
        (
            20000,
            [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0],
        ),
    ],
)
def test_buckets_1_2_5(limit: int, expect: list[float]) -> None:
    assert buckets_1_2_5(limit) == expect


@pytest.mark.parametrize(
    ("start", "expect"),
    [(0, [5, 6, 7]), (6, [6, 7]), (7, [7]), (8, []), (100, [])],
)
def test_replay_slice(start: int, expect: list[int]) -> None:
    buffer = deque([(5, b"a"), (6, b"b"), (7, b"c")], maxlen=3)
    assert [seq for seq, _ in replay_slice(buffer, start)] == expect


def test_flags_override_the_config_file() -> None:
    file_values = {"block_size": 32, "lmcache": {"enabled": True, "chunk_size": 512}, "server": {"port": 9}}
    engine, server = split_settings(
        file_values,
        {"block_size": None, "speed": 4.0, "lmcache": {"enabled": None, "remote_url": "redis://h:1"}},
        {"port": 8001, "host": None},
    )
    assert engine == {
        "block_size": 32,
        "speed": 4.0,
        "lmcache": {"enabled": True, "chunk_size": 512, "remote_url": "redis://h:1"},
    }
    assert server == {"port": 8001}
