import pytest

from kvstack.common import tokenizer as tok


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello world",
        "The Quick brown fox, 1234567 jumps!\n\nOver  the\tlazy dog.",
        "unicode: héllo wörld — 東京 🚀",
        "    leading spaces and trailing    ",
        "ABCDEF ghijkl MNO",
    ],
)
def test_round_trip(text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.VOCAB_SIZE for i in ids)


def test_density_is_bpe_like() -> None:
    text = "the scheduler decides which requests run in the next step of the engine " * 20
    ratio = len(text) / len(tok.encode(text))
    assert 2.5 <= ratio <= 4.5


def test_deterministic_and_stable_ids() -> None:
    # Ids are part of the wire contract between simulator and router: pin a few.
    assert tok.encode("hello") == tok.encode("hello")
    assert tok.encode(" a") == [tok._PIECE_TO_ID[" a"]]
    assert tok.VOCAB_SIZE < 128_256


def test_chat_template_keeps_prefix_when_history_grows() -> None:
    first = [("system", "You are terse."), ("user", "Hi")]
    second = [*first, ("assistant", "Hello"), ("user", "More")]
    a = tok.apply_chat_template(first, add_generation_prompt=False)
    b = tok.apply_chat_template(second)
    assert b[: len(a)] == a
    assert a[0] == tok.BOS_ID


def test_chat_template_text_shows_special_tokens() -> None:
    text = tok.render_chat_text([("user", "Hi")])
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_decode_rejects_out_of_vocab() -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.VOCAB_SIZE])
