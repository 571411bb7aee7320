"""``tokenizer: local`` on growing chats: the ids of a chat cut into pieces before its added tokens,
joined, equal the ids of the whole rendered chat (and transformers'), a new turn encodes only its
new pieces, tokenizers whose settings break that are encoded whole, and the check of a model's
first chats falls back to the whole text when the pieces differ."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from kvstack.common.token_cache import TokenCache, Tokens
from kvstack.router.local_tokenizer import VERIFY_CHATS, LocalTokenizers, ModelTokenizer
from kvstack.router.tokenizer_pieces import ChatPlan, added_token_pattern, chat_pieces, piece_refusal

from .conftest import MODEL, RouterFactory, RouterServer, Sim, chat_work
from .test_local_tokenizer import CORPUS, EOS, SPECIALS, reference_ids, write_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("model"))


def conversation(turns: int, system: str = CORPUS[1] * 20) -> list[list[dict[str, Any]]]:
    """The prompts of a multi-round chat: each resends the earlier turns with their answers."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    prompts = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"question {t}: " + CORPUS[t % len(CORPUS)]})
        prompts.append(list(messages))
        messages.append({"role": "assistant", "content": f"answer {t} " + CORPUS[(t + 1) % len(CORPUS)]})
    return prompts


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("", []),
        ("plain", ["plain"]),
        ("<|eot_id|>", ["<|eot_id|>"]),
        ("a<|eot_id|>b", ["a", "<|eot_id|>b"]),
        ("<|eot_id|><|eot_id|>x", ["<|eot_id|>", "<|eot_id|>x"]),
        ("x<|end_of_text|>", ["x", "<|end_of_text|>"]),
        ("<|eot_id <|eot_id|>", ["<|eot_id ", "<|eot_id|>"]),  # a broken token is text
    ],
)
def test_text_is_cut_before_each_added_token(text: str, pieces: list[str]) -> None:
    assert chat_pieces(text, added_token_pattern(SPECIALS)) == pieces


def test_the_longest_added_token_wins_where_two_start() -> None:
    assert chat_pieces("a<|x|>yb", added_token_pattern(["<|x|>", "<|x|>y"])) == ["a", "<|x|>yb"]
    assert chat_pieces("ab", added_token_pattern([])) == ["ab"]


def test_growing_chats_equal_the_whole_text_and_transformers(model_dir: Path) -> None:
    local = LocalTokenizers(model_dir, TokenCache())
    whole = ModelTokenizer(model_dir)
    prompts = conversation(6)
    for t, chat in enumerate(prompts):
        before = local.piece_runs
        ours = local.tokens("m", chat_work(chat))
        assert list(ours) == list(whole.chat(chat)) == reference_ids(model_dir, chat=chat)
        if t:  # only the last answer's and the new question's content pieces; headers are known
            assert local.piece_runs - before == 2
    assert local.runs == len(prompts)
    assert local.for_model("m").piece_pattern is not None  # the check of the first chats passed


# message contents made of fragments that stress the cut: added tokens and their halves, whitespace
# that a pre-tokenizer might merge across a cut, multi-byte characters
messages_text = st.lists(
    st.sampled_from(["a", "bc", " ", "  ", "\n", "\t", "é", "🚀", "12", "<|eot_id|>", "<|", "|>", "\r\n"]),
    max_size=20,
).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(contents=st.lists(messages_text, min_size=1, max_size=6))
def test_pieces_joined_equal_the_whole_text_for_any_messages(model_dir: Path, contents: list[str]) -> None:
    tok = ModelTokenizer(model_dir)
    roles = ["system", "user", "assistant", "user", "assistant", "user"]
    chat = [{"role": r, "content": c} for r, c in zip(roles, contents, strict=False)]
    text = tok.render_chat(chat)
    joined = [i for ids in tok.encode_all(chat_pieces(text, tok.piece_pattern)) for i in ids]
    assert joined == list(tok.encode(text, add_special_tokens=False))


def tokenizer_spec(**changes: Any) -> dict[str, Any]:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(SPECIALS)
    spec: dict[str, Any] = json.loads(tok.to_str())
    return {**spec, **changes}


def _stripping(spec: dict[str, Any], token: str = EOS) -> dict[str, Any]:
    tokens = [{**t, "lstrip": t["content"] == token} for t in spec["added_tokens"]]
    return {**spec, "added_tokens": tokens}


@pytest.mark.parametrize(
    ("spec", "refusal"),
    [
        (tokenizer_spec(), None),
        (tokenizer_spec(normalizer={"type": "NFC"}), None),
        (_stripping(tokenizer_spec()), "'<|eot_id|>' strips"),
        (tokenizer_spec(normalizer={"type": "Prepend", "prepend": "▁"}), "normalizer ['Prepend']"),
        (tokenizer_spec(pre_tokenizer={"type": "Metaspace"}), "pre-tokenizer ['Metaspace']"),
        (
            tokenizer_spec(pre_tokenizer={"type": "Sequence", "pretokenizers": [{"type": "Metaspace"}]}),
            "pre-tokenizer ['Metaspace']",
        ),
        (tokenizer_spec(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True}), "prefix space"),
    ],
)
def test_tokenizers_whose_pieces_may_differ_are_encoded_whole(
    spec: dict[str, Any], refusal: str | None
) -> None:
    found = piece_refusal(spec)
    if refusal is None:
        assert found is None
    else:
        assert found is not None and refusal in found


def stripping_model(folder: Path) -> Path:
    """The test model with ``<|start_header_id|>`` taking the whitespace on its left (the template
    writes a newline and an indent there, in the piece before it): its pieces encode differently."""
    write_model(folder)
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text())
    path.write_text(json.dumps(_stripping(spec, "<|start_header_id|>")))
    return folder


def test_a_model_whose_pieces_differ_is_encoded_whole(tmp_path: Path) -> None:
    local = LocalTokenizers(stripping_model(tmp_path), TokenCache())
    chat = conversation(2)[1]
    refusal = local.for_model("m").piece_refusal
    assert refusal == "added token '<|start_header_id|>' strips or matches whole words"
    assert list(local.tokens("m", chat_work(chat))) == list(ModelTokenizer(tmp_path).chat(chat))
    assert local.piece_runs == 0


def test_the_check_of_the_first_chats_turns_pieces_off_when_they_differ(tmp_path: Path) -> None:
    local = LocalTokenizers(stripping_model(tmp_path), TokenCache())
    tok = local.for_model("m")
    tok.piece_pattern = added_token_pattern(SPECIALS)  # as if its settings had passed
    chat = conversation(2)[1]
    whole = list(ModelTokenizer(tmp_path).chat(chat))
    pieces = [i for ids in tok.encode_all(chat_pieces(tok.render_chat(chat), tok.piece_pattern)) for i in ids]
    assert pieces != whole  # the pieces really differ here
    assert list(local.tokens("m", chat_work(chat))) == whole
    assert tok.piece_pattern is None


def planned(local: LocalTokenizers, chats: list[list[dict[str, Any]]]) -> list[tuple[ChatPlan, Tokens]]:
    """Each chat planned, encoded and joined in turn, as the router does (no check run): the plans
    and the ids."""
    out = []
    for chat in chats:
        work = chat_work(chat)
        plan = local.plan("m", work)
        assert plan is not None
        out.append((plan, local.finish("m", work, plan, local.encode("m", plan))))
    return out


def test_the_check_ends_after_the_first_chats(model_dir: Path) -> None:
    plans = planned(LocalTokenizers(model_dir, TokenCache()), conversation(VERIFY_CHATS + 2))
    assert [plan.verify for plan, _ in plans] == [True] * VERIFY_CHATS + [False, False]


def test_a_growing_chat_through_the_router_encodes_only_its_new_pieces(
    sims: list[Sim], router: RouterFactory, tmp_path: Path
) -> None:
    write_model(tmp_path / MODEL)
    r = router(engines=[sims[0].url], policy="cache_aware", tokenizer="local", tokenizer_path=tmp_path,
               tokenize_offload_min_chars=200)  # fmt: skip
    prompts = conversation(4)
    for chat in prompts:
        body = {"model": MODEL, "messages": chat, "max_tokens": 2}
        resp = httpx.post(f"{r.url}/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
    expected = sum(len(ModelTokenizer(tmp_path / MODEL).chat(chat)) for chat in prompts)
    assert r.metric("kvstack_router_prompt_tokens_total", policy="cache_aware") == expected
    endpoint: Any = r.app.direct["/v1/chat/completions"]
    local = endpoint.prompts.local
    assert local.runs == len(prompts)
    # turn 0: the BOS, the system message's 3 pieces, the question's 3, the generation prompt's 2;
    # then per turn the last answer's and the new question's content pieces (the rest are known)
    assert local.piece_runs == 9 + 2 * (len(prompts) - 1)


def local_router(router: RouterFactory, sim: Sim, models: Path) -> tuple[RouterServer, LocalTokenizers]:
    """A cache-aware router in front of ``sim`` tokenizing with the model files under ``models``."""
    r = router(engines=[sim.url], policy="cache_aware", tokenizer="local", tokenizer_path=models)
    assert r.ctx.local_tokenizers is not None
    return r, r.ctx.local_tokenizers


def test_the_router_loads_the_tokenizers_of_its_engines_models_before_it_serves(
    sims: list[Sim], router: RouterFactory, tmp_path: Path
) -> None:
    write_model(tmp_path / MODEL)
    _, local = local_router(router, sims[0], tmp_path)
    assert local.loaded == {MODEL}  # no request has been sent yet
    assert local.runs == 0


def test_the_router_checks_the_first_chats_after_sending_them_and_then_trusts_the_whole_text(
    sims: list[Sim], router: RouterFactory, tmp_path: Path
) -> None:
    stripping_model(tmp_path / MODEL)
    r, local = local_router(router, sims[0], tmp_path)
    tok = local.for_model(MODEL)
    tok.piece_pattern = added_token_pattern(SPECIALS)  # as if its settings had passed
    chat = conversation(2)[1]
    body = {"model": MODEL, "messages": chat, "max_tokens": 2}
    resp = httpx.post(f"{r.url}/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    whole = list(ModelTokenizer(tmp_path / MODEL).chat(chat))
    deadline = time.monotonic() + 10
    while tok.piece_pattern is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert tok.piece_pattern is None  # the check found the pieces differ, after the request
    assert list(local.cached(MODEL, chat_work(chat)) or []) == whole
