"""Table tests of :class:`kvstack.engine.sim.answer.Answer`: the one reading of a request's outputs
that every generating route shares (text, counts, finish reason, stop strings)."""

from __future__ import annotations

import pytest

from kvstack.common.tokenizer import encode
from kvstack.engine.sim.answer import Answer
from kvstack.engine.sim.types import FinishReason, RequestOutput


def out(text: str | list[int], reason: FinishReason | None = None, cached: int = 0) -> RequestOutput:
    """An output of ``text`` (or these ids); final when it carries a finish reason."""
    ids = encode(text) if isinstance(text, str) else text
    return RequestOutput(ids, reason is not None, reason, cached)


E_ACUTE = list("é".encode())  # two byte-fallback ids: one character


@pytest.mark.parametrize(
    ("stops", "include", "outputs", "released", "finish", "stop_reason"),
    [
        ((), False, [out("Hello"), out(" world", "length")], "Hello world", "length", None),
        ((), False, [out("Hi", "stop")], "Hi", "stop", None),  # the engine's own stop (EOS)
        ((), False, [RequestOutput(encode("Hi"), True, None)], "Hi", "length", None),  # final, no reason
        ((), False, [out("Hi"), out(" there")], "Hi there", "abort", None),  # not finished yet
        # a stop string across two outputs: the answer ends before it, whatever follows
        (("END",), False, [out("abc EN"), out("D more"), out("x", "length")], "abc ", "stop", "END"),
        (("END",), True, [out("abc EN"), out("D more")], "abc END", "stop", "END"),
        # in the final output, the stop string is the reason, not the engine's
        (("END",), False, [out("abc"), out(" END tail", "length")], "abc ", "stop", "END"),
        # held back as a possible stop string's start, released when the answer ends without one
        (("END",), False, [out("abc E"), out("x", "length")], "abc Ex", "length", None),
        # a character split across outputs is released whole
        ((), False, [out(E_ACUTE[:1]), out([*E_ACUTE[1:], *encode("!")], "length")], "é!", "length", None),
    ],
)
def test_an_answer_releases_the_text_and_ends_as_vllm_does(
    stops: tuple[str, ...],
    include: bool,
    outputs: list[RequestOutput],
    released: str,
    finish: str,
    stop_reason: str | None,
) -> None:
    answer = Answer(stops, include)
    text = ""
    for o in outputs:
        text += answer.take(o)
        if answer.done:
            break
    assert (text, answer.finish, answer.stop_reason) == (released, finish, stop_reason)
    assert answer.done is (finish != "abort")


def test_an_answer_counts_generated_tokens_and_keeps_the_cached_count() -> None:
    answer = Answer()
    outputs = [out("a b", cached=16), out(" c"), out(" d", "length")]  # the core reports cached once
    for o in outputs:
        answer.take(o)
    assert answer.generated == sum(len(o.new_token_ids) for o in outputs)
    assert answer.cached == 16
