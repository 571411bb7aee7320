"""Long chat pieces cut after a start they share (``router/tokenizer_starts.py``): where a cut may
fall, how starts are learnt and kept, that the start's ids and the rest's joined equal the whole
piece's on GPT-2- and Llama-3-shaped tokenizers, that a chat's ids stay the whole chat's while each
user's first turn encodes only its own part, and that the check turns cuts off where they differ."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, pre_tokenizers

from kvstack.common.token_cache import TokenCache
from kvstack.router.local_tokenizer import VERIFY_CHATS, VERIFY_CUTS, LocalTokenizers, ModelTokenizer
from kvstack.router.tokenizer_starts import (
    CHUNK_CHARS,
    KEPT_STARTS,
    LEARN_MIN_CHARS,
    SHARED_MIN_CHARS,
    SharedStarts,
    common_length,
    last_cut,
    opens_word,
    start_refusal,
)

from .conftest import chat_work
from .test_local_tokenizer import write_model
from .test_local_tokenizer_pieces import planned

# Llama 3's split pattern, as its tokenizer.json holds it (before a ByteLevel without its regex)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def llama3_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


@pytest.fixture(scope="module", params=["gpt2", "llama3"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    shape = None if request.param == "gpt2" else llama3_pre_tokenizer()
    return write_model(tmp_path_factory.mktemp(request.param), shape)


@pytest.mark.parametrize(
    ("text", "at", "opens"),
    [
        ("abc def", 3, True),
        ("abc def", 2, False),  # inside a word
        ("abc def", 4, False),  # after the space
        ("abc  def", 3, False),  # two spaces: a pattern may give one to each side
        ("abc\\ndef", 3, False),
        ("abc 1", 3, False),  # a number after the space
        ("ab. def", 3, False),  # punctuation before the space
        ("é ü", 1, True),  # letters of any script
        ("abc d", 3, True),
        ("abc ", 3, False),  # nothing after the space
        ("abc def", 0, False),
    ],
)
def test_a_cut_falls_between_a_letter_and_a_space_led_word(text: str, at: int, opens: bool) -> None:
    assert opens_word(text, at) is opens


@pytest.mark.parametrize(
    ("a", "b", "length"),
    [
        ("x" * 1000, "x" * 1000, 1000),
        ("x" * 1000, "x" * 600 + "y" * 400, 600),
        ("x" * CHUNK_CHARS * 2, "x" * CHUNK_CHARS * 2 + "y", CHUNK_CHARS * 2),
        ("x" * CHUNK_CHARS + "ab", "x" * CHUNK_CHARS + "ac", CHUNK_CHARS + 1),
        ("x" * 1000, "y" * 1000, 0),
        ("x" * 1000, "", 0),
    ],
)
def test_common_starts_are_found_to_the_character(a: str, b: str, length: int) -> None:
    assert common_length(a, b) == length


@pytest.mark.parametrize(
    ("text", "end", "cut"),
    [
        ("aaa bbb ccc", 11, 7),
        ("aaa bbb ccc", 7, 7),
        ("aaa bbb ccc", 6, 3),
        ("aaa bbb 123", 11, 3),  # not before a number
        ("aaa 123 ccc", 11, None),  # nor after one
        ("aa " + "b" * 600 + " ccc", 602, None),  # no boundary near enough
        ("aaabbb", 6, None),
    ],
)
def test_the_cut_is_the_last_word_boundary_before_the_common_end(
    text: str, end: int, cut: int | None
) -> None:
    assert last_cut(text, end) == cut


@pytest.mark.parametrize(
    ("pre_tokenizer", "refused"),
    [
        ({"type": "ByteLevel", "add_prefix_space": False}, False),  # GPT-2's regex by default
        ({"type": "ByteLevel", "use_regex": False}, True),  # one pre-token a piece: BPE across words
        (
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated"},
                    {"type": "ByteLevel", "use_regex": False},
                ],
            },
            False,
        ),
        ({"type": "Whitespace"}, False),
        ({"type": "Digits", "individual_digits": True}, True),
        (None, True),
    ],
)
def test_tokenizers_that_do_not_split_before_words_are_not_cut(
    pre_tokenizer: dict[str, Any] | None, refused: bool
) -> None:
    assert (start_refusal({"pre_tokenizer": pre_tokenizer}) is not None) is refused


def words(tag: str, n: int) -> str:
    return "".join(f" {tag}{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}" for i in range(n))


SHARED = "<|start_header_id|>system<|end_header_id|>\n\nYou answer from the document." + words("s", 800)


def test_a_start_two_pieces_share_is_learnt_and_cuts_the_next() -> None:
    starts = SharedStarts()
    first, second, third = (SHARED + words(tag, 300) for tag in ("u", "v", "w"))
    assert starts.split(first) is None  # nothing to compare with yet
    cut = starts.split(second)
    assert cut is not None and "".join(cut) == second
    start, rest = cut
    assert SHARED_MIN_CHARS <= len(start) <= len(SHARED) and rest.startswith(" ")
    assert opens_word(second, len(start))
    assert starts.split(third) == (start, third[len(start) :])  # known now: no comparison
    assert len(starts) == 1


@pytest.mark.parametrize(
    "pieces",
    [
        pytest.param([SHARED[:1500] + words("u", 100)] * 2, id="too short to learn from"),
        pytest.param([words("a", 600), words("b", 600)], id="nothing shared"),
        pytest.param(
            [SHARED[:900] + words("u", 600), SHARED[:900] + words("v", 600)], id="shared start short"
        ),
        pytest.param([SHARED + words("u", 300)] * 2, id="the same piece twice"),
    ],
)
def test_pieces_without_a_long_shared_start_are_not_cut(pieces: list[str]) -> None:
    starts = SharedStarts()
    assert [starts.split(p) for p in pieces] == [None] * len(pieces)
    assert len(starts) == 0


def test_a_known_start_cuts_only_where_a_word_follows() -> None:
    starts = SharedStarts()
    starts.split(SHARED + words("u", 300))
    start, _ = starts.split(SHARED + words("v", 300)) or ("", "")
    follows_digit = start + "7" + words("x", 300)
    cut = starts.split(follows_digit)
    assert cut is None or cut[0] != start  # never cut before the digit


def test_starts_kept_are_bounded() -> None:
    starts = SharedStarts()
    for n in range(KEPT_STARTS + 5):
        shared = f"<|start_header_id|>system<|end_header_id|>\n\n{n:03d}" + words(f"k{n}q", 700)
        starts.split(shared + words("u", 200))
        starts.split(shared + words("v", 200))
    assert len(starts) == KEPT_STARTS


fragments = st.sampled_from(
    ["a", "bc", "Déf", " ", "  ", "\n", "\n\n", "\t", "12", "3", ".", "'s", "🚀", " ok"]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shared=st.lists(fragments, min_size=1, max_size=30).map("".join), tails=st.lists(fragments, max_size=30)
)
def test_a_start_and_its_rest_encode_as_the_whole_piece(
    model_dir: Path, shared: str, tails: list[str]
) -> None:
    tok = ModelTokenizer(model_dir)
    starts = SharedStarts()
    body = (shared * (LEARN_MIN_CHARS // len(shared) + 1))[: LEARN_MIN_CHARS + 100]
    tail = "".join(tails)
    for piece in (body + " ends" + tail, body + " finds" + tail[::-1], body + " again" + tail):
        cut = starts.split(piece)
        if cut is not None:
            start, rest = cut
            joined = [
                *tok.encode(start, add_special_tokens=False),
                *tok.encode(rest, add_special_tokens=False),
            ]
            assert joined == list(tok.encode(piece, add_special_tokens=False))


def first_turns(users: int) -> list[list[dict[str, Any]]]:
    """Each user's first turn: the shared system prompt followed by the user's own document."""
    system = "You answer from the document." + words("s", 800)
    return [
        [{"role": "system", "content": system + words(f"d{u}", 400)}, {"role": "user", "content": f"q {u}?"}]
        for u in range(users)
    ]


def test_first_turns_encode_their_own_part_and_equal_the_whole_chat(model_dir: Path) -> None:
    chats = first_turns(VERIFY_CHATS + 4)
    local = LocalTokenizers(model_dir, TokenCache())
    plans = planned(local, chats)
    whole = ModelTokenizer(model_dir)
    assert [list(ids) for _, ids in plans] == [list(whole.chat(chat)) for chat in chats]
    # the second user's turn learnt the start (the piece from the header's end through the shared
    # text); from the third its ids come from the cache
    encoded = [plan.chars_to_encode() for plan, _ in plans]
    start = len("<|end_header_id|>\n\n" + chats[0][0]["content"]) - len(words("d0", 400))
    assert encoded[2:] == [encoded[1] - start] * (len(encoded) - 2)
    assert [plan.cut for plan, _ in plans] == [False] + [True] * (len(chats) - 1)
    assert len(local.for_model("m").starts or ()) == 1


def test_the_router_checks_the_first_cuts_after_the_chat_checks(model_dir: Path) -> None:
    plans = planned(LocalTokenizers(model_dir, TokenCache()), first_turns(VERIFY_CHATS + 8))
    # the first chats are all checked; then the first VERIFY_CUTS cut ones; then none
    assert [plan.verify for plan, _ in plans] == [True] * (VERIFY_CHATS + VERIFY_CUTS) + [False] * 4


def test_a_cut_piece_stands_for_the_whole_piece_only_after_the_checks_passed(model_dir: Path) -> None:
    local = LocalTokenizers(model_dir, TokenCache())
    whole = ModelTokenizer(model_dir)
    users = first_turns(VERIFY_CUTS + 3)

    def second_turn(user: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [*user, {"role": "assistant", "content": "an answer"}, {"role": "user", "content": "more?"}]

    def cut_again(user: list[dict[str, Any]]) -> bool:
        """Whether the user's next turn cuts the system message again (its whole piece not cached)."""
        plan = local.plan("m", chat_work(second_turn(user)))
        return plan is not None and plan.cut

    checked = planned(local, users[:2])  # learnt on the second; nothing checked yet
    assert cut_again(users[1])
    for chat, (plan, ids) in zip(users[2:], planned(local, users[2:]), strict=True):
        checked.append((plan, ids))
        local.check("m", chat_work(chat), plan, ids, whole.chat(chat))
    for chat, (plan, ids) in zip(users[:2], checked[:2], strict=True):
        local.check("m", chat_work(chat), plan, ids, whole.chat(chat))
    # every cut passed: a new user's system message is cached whole, its next turn is not cut
    (new_user,) = first_turns(len(users) + 1)[-1:]
    planned(local, [new_user])
    assert not cut_again(new_user)


def merging_across_words(folder: Path) -> Path:
    """The test model cut into lines only, its first merges joining a letter to the space after it:
    a cut before a space-led word then changes the ids."""
    split_lines = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    path = write_model(folder, split_lines) / "tokenizer.json"
    spec = json.loads(path.read_text())
    bpe = spec["model"]
    for letter in "abcdefghijklmnopqrstuvwxyz":
        bpe["vocab"].setdefault(letter + "Ġ", len(bpe["vocab"]) + 100)
        bpe["merges"].insert(0, [letter, "Ġ"] if isinstance(bpe["merges"][0], list) else f"{letter} Ġ")
    path.write_text(json.dumps(spec))
    return folder


def test_a_model_whose_cuts_differ_stops_cutting_and_keeps_its_pieces(tmp_path: Path) -> None:
    folder = merging_across_words(tmp_path)
    assert start_refusal(json.loads((folder / "tokenizer.json").read_text())) is None  # it has a Split
    local = LocalTokenizers(folder, TokenCache())
    whole = ModelTokenizer(folder)
    tok = local.for_model("m")
    differed = False
    for chat in first_turns(VERIFY_CHATS + 4):
        work = chat_work(chat)
        assert list(local.tokens("m", work)) == list(whole.chat(chat))
        differed = differed or tok.starts is None
    assert differed and tok.starts is None  # the check found the cut's ids wrong
    assert tok.piece_pattern is not None  # pieces at added tokens are still right
