"""What in a request is the prompt, its digests, its tokens and text for policies: pure, table-driven."""

from __future__ import annotations

from array import array
from typing import Any

import msgspec
import pytest

from kvstack.common import tokenizer
from kvstack.common.errors import OpenAIError
from kvstack.router.prompts import (
    PromptCache,
    PromptWork,
    engine_key,
    known_prefix,
    prompt_text,
    prompt_token_ids,
    prompt_work,
    render_missing,
    work_tokens,
)
from kvstack.router.protocol import Kind, parse_request

from .conftest import chat_work


def parse(kind: Kind, body: dict[str, Any]) -> Any:
    return parse_request(kind, msgspec.json.encode({"model": "m", **body}))


SYSTEM = {"role": "system", "content": "be brief"}
PARTS = {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {}}]}


def test_chat_prompt_tokens_follow_the_shared_chat_template() -> None:
    parsed = parse("chat", {"messages": [SYSTEM, PARTS]})
    expected = tokenizer.apply_chat_template([("system", "be brief"), ("user", "hi")])
    assert list(prompt_token_ids(parsed, PromptCache()) or []) == expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hello world", tokenizer.encode("hello world")),
        (["first", "second"], tokenizer.encode("first")),
        ([5, 6, 7], [5, 6, 7]),
        ([[8, 9], [1]], [8, 9]),
        ([0, 2**32 - 1], [0, 2**32 - 1]),  # the whole uint32 range: the engine judges its vocabulary
    ],
)
def test_completion_prompt_tokens(prompt: Any, expected: list[int]) -> None:
    parsed = parse("completion", {"prompt": prompt})
    assert list(prompt_token_ids(parsed, PromptCache()) or []) == expected


@pytest.mark.parametrize(
    ("kind", "body", "expected"),
    [
        ("completion", {"prompt": "once upon"}, "once upon"),
        ("completion", {"prompt": ["a", "b"]}, "a"),
        ("completion", {"prompt": [1, 2]}, None),
        ("completion", {"prompt": [[1, 2]]}, None),
        ("embedding", {"input": "embed me"}, "embed me"),
        ("chat", {"messages": [SYSTEM, PARTS]}, "be brief\nhi"),
        ("chat", {"messages": [{"role": "assistant", "content": None}]}, ""),
        ("tokenize", {"messages": [SYSTEM]}, "be brief"),
        ("detokenize", {"tokens": [1]}, None),
    ],
)
def test_prompt_text(kind: Kind, body: dict[str, Any], expected: str | None) -> None:
    assert prompt_text(parse(kind, body)) == expected


def test_equal_prompts_return_the_same_array_object() -> None:
    # The key cache finds block keys by object identity: equal prompts in new request bodies must
    # come back as the very same object, for chats and completions alike.
    cache = PromptCache()
    chat = {"messages": [SYSTEM, {"role": "user", "content": "tell me more"}]}
    first = prompt_token_ids(parse("chat", chat), cache)
    again = prompt_token_ids(parse("chat", chat), cache)
    assert isinstance(first, array) and first.typecode == "I" and first is again
    text = prompt_token_ids(parse("completion", {"prompt": "a document"}), cache)
    assert text is prompt_token_ids(parse("completion", {"prompt": "a document"}), cache)
    assert (cache.hits, cache.misses) == (2, 2)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # the role/content boundary moves: same characters, different messages
        ([{"role": "user", "content": "ab"}], [{"role": "usera", "content": "b"}]),
        ([{"role": "user", "content": "a"}], [{"role": "user", "content": "a"}] * 2),
        ([{"role": "user", "content": "x"}], [{"role": "system", "content": "x"}]),
    ],
)
def test_different_chats_never_share_cached_tokens(a: list[Any], b: list[Any]) -> None:
    cache = PromptCache()
    ta = prompt_token_ids(parse("chat", {"messages": a}), cache)
    tb = prompt_token_ids(parse("chat", {"messages": b}), cache)
    assert ta != tb and cache.misses == 2


def test_a_chat_and_a_completion_with_the_same_text_differ() -> None:
    cache = PromptCache()
    chat = prompt_token_ids(parse("chat", {"messages": [{"role": "user", "content": "same"}]}), cache)
    text = prompt_token_ids(parse("completion", {"prompt": "same"}), cache)
    assert chat != text and cache.misses == 2


def test_content_parts_join_with_newlines_as_the_engine_renders_them() -> None:
    # vLLM (and the simulator) join the text parts of a content array with "\n"; block keys built
    # from any other rendering never match the engine's KV events.
    from kvstack.router.prompts import message_text

    parts = [
        {"type": "text", "text": "a"},
        {"type": "image_url", "image_url": {}},
        {"type": "text", "text": "b"},
    ]
    assert message_text(parts) == "a\nb"


def test_a_chat_renders_only_the_messages_the_cache_lacks() -> None:
    # A shared system prompt is rendered once; a new question under it renders only the question,
    # and the joined arrays are exactly the template's tokens.
    cache = PromptCache()
    assert cache.messages is not None
    system = {"role": "system", "content": "you answer questions about the document"}
    asked: list[list[int]] = []
    for question in ("what is it about?", "who wrote it?", "what is it about?"):
        chat = {"messages": [system, {"role": "user", "content": question}]}
        tokens = prompt_token_ids(parse("chat", chat), cache)
        expected = tokenizer.apply_chat_template([("system", system["content"]), ("user", question)])
        assert list(tokens or []) == expected
        asked.append(expected)
    # prompts: two made, the repeat a hit; messages: system + two questions made, system reused once
    assert (cache.hits, cache.misses) == (1, 2)
    assert (cache.messages.hits, cache.messages.misses) == (1, 3)
    assert len(cache.messages) == 3


def test_a_message_is_keyed_by_role_and_content_together() -> None:
    cache = PromptCache()
    a = prompt_token_ids(parse("chat", {"messages": [{"role": "user", "content": "x"}]}), cache)
    b = prompt_token_ids(parse("chat", {"messages": [{"role": "system", "content": "x"}]}), cache)
    assert cache.messages is not None and len(cache.messages) == 2 and a != b


LONG = {"role": "system", "content": "Answer from the handbook only. " * 80}  # 2,480 characters
QUESTION = {"role": "user", "content": "Which page covers refunds?"}
ANSWER = {"role": "assistant", "content": "Page twelve."}
Chat = list[dict[str, Any]]


def full_tokens(messages: list[dict[str, Any]]) -> list[int]:
    return tokenizer.apply_chat_template([(m["role"], m["content"]) for m in messages])


@pytest.mark.parametrize(
    ("rendered", "messages", "limit", "known"),
    [
        # a new question after a rendered system prompt: route on the system prompt
        ([LONG], [LONG, QUESTION], 2048, [LONG]),
        # a new turn of a rendered conversation: the answer and the question come later
        ([LONG, QUESTION], [LONG, QUESTION, ANSWER, QUESTION], 2048, [LONG, QUESTION]),
        # nothing rendered, all short: only the BOS is known
        ([], [SYSTEM, QUESTION], 2048, []),
        # a rendered message after an unrendered one does not count: the prefix stops at the gap
        ([QUESTION], [SYSTEM, QUESTION], 2048, []),
        # the unrendered rest is longer than the limit: tokenize it all before routing
        ([], [LONG, QUESTION], 2048, None),
        ([SYSTEM], [SYSTEM, QUESTION], len("user") + len(QUESTION["content"]) - 1, None),
        # everything rendered: the whole prompt is a cheap join
        ([SYSTEM, QUESTION], [SYSTEM, QUESTION], 2048, None),
    ],
)
def test_known_prefix_is_an_exact_prefix_of_the_prompt(
    rendered: list[dict[str, Any]],
    messages: list[dict[str, Any]],
    limit: int,
    known: list[dict[str, Any]] | None,
) -> None:
    cache = PromptCache()
    assert cache.messages is not None
    for m in rendered:
        work = chat_work([m])
        cache.messages.get(work.parts[0], lambda m=m: tokenizer.render_message(m["role"], m["content"]))
    prefix = known_prefix(chat_work(messages), cache, limit)
    if known is None:
        assert prefix is None
        return
    assert prefix is not None
    full = full_tokens(messages)
    expected = [
        tokenizer.BOS_ID,
        *(t for m in known for t in tokenizer.render_message(m["role"], m["content"])),
    ]
    assert list(prefix.tokens) == expected == full[: len(expected)]
    assert len(prefix.missing) == len(messages) - len(known)
    # the length is estimated from characters: near the real one, never below what is known
    assert len(expected) < prefix.total
    assert abs(prefix.total - len(full)) <= 0.35 * (len(full) - len(expected))


def test_requests_on_the_same_known_start_share_one_array() -> None:
    """The policy's key cache then finds their block keys by identity instead of hashing again."""
    cache = PromptCache()
    assert cache.messages is not None
    rendered = tokenizer.render_message(LONG["role"], LONG["content"])
    cache.messages.get(chat_work([LONG]).parts[0], lambda: rendered)
    other = {"role": "user", "content": "And which one covers returns?"}
    first = known_prefix(chat_work([LONG, QUESTION]), cache, 2048)
    second = known_prefix(chat_work([LONG, other]), cache, 2048)
    assert first is not None and second is not None
    assert second.tokens is first.tokens
    # the whole chat of that one message ends with the generation prompt: a different entry
    whole = work_tokens(chat_work([LONG]), cache)
    assert whole is not None and list(whole) == full_tokens([LONG]) != list(first.tokens)


def test_rendering_the_missing_messages_completes_the_next_prompt() -> None:
    cache = PromptCache()
    assert cache.messages is not None
    messages = [SYSTEM, QUESTION]
    prefix = known_prefix(chat_work(messages), cache, 2048)
    assert prefix is not None
    render_missing(prefix, cache.messages)
    assert known_prefix(chat_work(messages), cache, 2048) is None  # all rendered now
    before = cache.messages.misses
    assert list(work_tokens(chat_work(messages), cache) or []) == full_tokens(messages)
    assert cache.messages.misses == before  # the join rendered nothing


@pytest.mark.parametrize(
    ("kind", "body", "param", "where"),
    [
        ("completion", {"prompt": [-1]}, "prompt", "'prompt[0]' is -1"),
        ("completion", {"prompt": [1, 2**32]}, "prompt", "'prompt[1]' is 4294967296"),
        ("completion", {"prompt": [10**30]}, "prompt", f"is {10**30}"),
        ("completion", {"prompt": [10**400]}, "prompt", "is an integer of 1329 bits"),
        ("completion", {"prompt": [-(10**400)]}, "prompt", "is an integer of 1329 bits"),
        ("completion", {"prompt": [[-5]]}, "prompt", "'prompt[0][0]' is -5"),
        ("completion", {"prompt": [[1], [2, -5]]}, "prompt", "'prompt[1][1]' is -5"),
        ("embedding", {"input": [-1]}, "input", "'input[0]' is -1"),
        ("embedding", {"input": [[7], [2**32]]}, "input", "'input[1][0]' is 4294967296"),
        ("tokenize", {"prompt": [-1]}, "prompt", "'prompt[0]' is -1"),
        ("detokenize", {"tokens": [3, -1]}, "tokens", "'tokens[1]' is -1"),
    ],
)
def test_token_ids_out_of_uint32_are_a_400_naming_the_field(
    kind: Kind, body: dict[str, Any], param: str, where: str
) -> None:
    with pytest.raises(OpenAIError) as caught:
        parse(kind, body)
    err = caught.value
    assert (err.status, err.param) == (400, param)
    assert where in err.message and "token ids are integers in 0..4294967295" in err.message
    assert len(err.message) < 200


@pytest.mark.parametrize(
    ("prompt", "valid"),
    [
        ([True], False),  # a boolean is not a token id
        ([1, 2.0], False),
        ([1, [2]], False),
        ([[1], []], False),  # an empty prompt in a batch
        ([[1], "a"], False),
        (["a", 1], False),
        ([[1], [2, 3]], True),
        (["a", "b"], True),
        ([0], True),
    ],
)
def test_prompt_shapes(prompt: Any, valid: bool) -> None:
    if valid:
        assert parse("completion", {"prompt": prompt}).body["prompt"] == prompt
        return
    with pytest.raises(OpenAIError) as caught:
        parse("completion", {"prompt": prompt})
    assert (caught.value.status, caught.value.param) == (400, "prompt")
    assert "must be a string, an array of strings, or token ids" in caught.value.message


def test_token_ids_come_back_as_one_uint32_array() -> None:
    work = prompt_work(parse("completion", {"prompt": [1, 2, 3]}))
    assert isinstance(work, array) and work.typecode == "I" and list(work) == [1, 2, 3]
    batch = prompt_work(parse("tokenize", {"prompt": [[4, 5], [6]]}))  # a batch: its first prompt
    assert isinstance(batch, array) and list(batch) == [4, 5]


NAMED = {"role": "user", "content": "hi", "name": "ann"}
PLAIN = {"role": "user", "content": "hi"}
AS_PARTS = {"role": "user", "content": [{"type": "text", "text": "hi"}]}


@pytest.mark.parametrize(
    ("a", "b", "same_digest"),
    [
        (PLAIN, dict(PLAIN), True),
        # what an engine's chat template may read besides the text keeps messages apart...
        (PLAIN, NAMED, False),
        (PLAIN, AS_PARTS, False),
        (AS_PARTS, PARTS | {"role": "user"}, False),
    ],
)
def test_a_message_digest_covers_what_an_engine_template_reads(
    a: dict[str, Any], b: dict[str, Any], same_digest: bool
) -> None:
    wa, wb = chat_work([a]), chat_work([b])
    assert (wa.digest == wb.digest) is same_digest
    assert (engine_key("m", wa) == engine_key("m", wb)) is same_digest
    # ...while the built-in template renders only the role and text, as the simulator does
    cache = PromptCache()
    ta, tb = work_tokens(wa, cache), work_tokens(wb, cache)
    assert (list(ta) == list(tb)) is (wa.chat == wb.chat)


def test_engine_keys_are_scoped_by_model_and_kind() -> None:
    chat, text = chat_work([PLAIN]), prompt_work(parse("completion", {"prompt": "hi"}))
    assert isinstance(text, PromptWork)
    keys = {engine_key("m", chat), engine_key("m2", chat), engine_key("m", text), engine_key("m2", text)}
    assert len(keys) == 4 and chat.digest not in keys and text.digest not in keys
    assert chat.messages == [PLAIN] and text.messages is None
