"""``tokenizer: local``: the router's ids from the model's own files equal transformers' (what vLLM
calls), it finds them in the HF Hub cache layout, refuses missing files at start, and feeds the
cache-aware policy without a ``/tokenize`` round trip (the engine's as the fallback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from kvstack.common.token_cache import TokenCache
from kvstack.router.config import RouterSettings
from kvstack.router.local_tokenizer import (
    LocalTokenizerError,
    LocalTokenizers,
    ModelTokenizer,
    find_model_dir,
)

from .conftest import MODEL, RouterFactory, Sim, chat_work

BOS, EOS = "<|begin_of_text|>", "<|eot_id|>"
SPECIALS = [BOS, "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", EOS, "<unk>"]
# Llama-3's template shape: the BOS written by the template, whitespace control, raise_exception
TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Conversation roles must be system, user or assistant') }}
    {% endif %}
    {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{% endif %}"""
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "You are a helpful assistant. Answer briefly and cite your sources.",
    "def main():\n    return sum(range(10))  # twelve ünïcödé ☃ 🚀 characters\n",
    "Count: 1 2 3 4 5 6 7 8 9 10, then stop. Thanks!",
]
CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "hello there"}],
    [
        {"role": "system", "content": "You are terse.  "},
        {"role": "user", "content": "Count: 1 2 3, then stop.\n\nThanks!"},
        {"role": "assistant", "content": "1 2 3"},
        {"role": "user", "content": "again, ünïcödé ☃ <|eot_id|> inside"},
    ],
    [{"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "two"}]}],
]
PROMPTS = ["The quick brown fox", "  spaces\tand\nlines 12345 ", "émoji 🚀 bytes", ""]


def write_model(folder: Path, pre_tokenizer: pre_tokenizers.PreTokenizer | None = None) -> Path:
    """A Llama-3-shaped tokenizer, trained deterministically (as scripts/gpu/make_model.py does);
    by default its pre-tokenizer is GPT-2's regex ``ByteLevel``."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
    )
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # an AddedToken, as many models save their special tokens
        "bos_token": {
            "__type": "AddedToken",
            "content": BOS,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        },
        "eos_token": EOS,
        "unk_token": "<unk>",
        "model_max_length": 8192,
        "chat_template": TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("model"))


def reference_ids(model_dir: Path, chat: list[dict[str, Any]] | None = None, text: str = "") -> list[int]:
    """transformers' ids: what vLLM 0.24 renders for /v1/chat/completions and /v1/completions."""
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(model_dir))
    if chat is None:
        return list(ref.encode(text))
    messages = [
        {**m, "content": "\n".join(p["text"] for p in m["content"])} if isinstance(m["content"], list) else m
        for m in chat
    ]
    out = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids)


@pytest.mark.parametrize("chat", CHATS)
def test_chat_ids_equal_transformers_apply_chat_template(model_dir: Path, chat: list[dict[str, Any]]) -> None:
    ours = ModelTokenizer(model_dir).chat(chat)
    assert list(ours) == reference_ids(model_dir, chat=chat)
    assert ours[0] == ModelTokenizer(model_dir).encode(BOS, add_special_tokens=False)[0]
    assert list(ours).count(ours[0]) == 1  # one BOS: the template's, none added on top


@pytest.mark.parametrize("text", PROMPTS)
def test_text_ids_equal_transformers_encode(model_dir: Path, text: str) -> None:
    ours = ModelTokenizer(model_dir)
    assert list(ours.text(text)) == reference_ids(model_dir, text=text)


def test_long_prompts_are_encoded_off_the_event_loop_with_the_same_ids(
    sims: list[Sim], router: RouterFactory, tmp_path: Path
) -> None:
    write_model(tmp_path / MODEL)
    r = router(
        engines=[sims[0].url], policy="cache_aware", tokenizer="local", tokenizer_path=tmp_path,
        tokenize_offload_min_chars=100,
    )  # fmt: skip
    chat = [{"role": "user", "content": CORPUS[0] * 3}]
    post_chat(r.url, chat)
    expected = len(ModelTokenizer(tmp_path / MODEL).chat(chat))
    assert r.metric("kvstack_router_prompt_tokens_total", policy="cache_aware") == expected


_THREADS_AFTER_ENCODING = """
import os, sys
from pathlib import Path
from kvstack.router.local_tokenizer import ModelTokenizer
tok = ModelTokenizer(Path(sys.argv[1]))
before = len(os.listdir("/proc/self/task"))
tok.encode_all(["one text", "and another"] * 4)
print(len(os.listdir("/proc/self/task")) - before)
"""


@pytest.mark.parametrize(("setting", "pool"), [(None, False), ("true", True)])
def test_encoding_starts_no_thread_pool_unless_the_operator_asks(
    model_dir: Path, setting: str | None, pool: bool
) -> None:
    """HF tokenizers' rayon pool (a thread per core, spinning for work) cost ~1 ms of CPU a request
    on a 16-core host; the router encodes one prompt at a time and keeps it off, but an operator's
    TOKENIZERS_PARALLELISM stands."""
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    if setting is not None:
        env["TOKENIZERS_PARALLELISM"] = setting
    run = [sys.executable, "-c", _THREADS_AFTER_ENCODING, str(model_dir)]
    new_threads = int(subprocess.run(run, env=env, check=True, capture_output=True, text=True).stdout)
    assert (new_threads > 0) is pool


def test_template_errors_are_local_tokenizer_errors(model_dir: Path) -> None:
    with pytest.raises(LocalTokenizerError, match="roles must be"):
        ModelTokenizer(model_dir).chat([{"role": "tool", "content": "x"}])


def test_model_files_found_in_the_hub_cache_layout(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--org--tiny"
    write_model(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    assert find_model_dir(tmp_path, "org/tiny") == repo / "snapshots" / "abc123"
    write_model(tmp_path / "plain" / "org" / "other")
    assert find_model_dir(tmp_path / "plain", "org/other") == tmp_path / "plain" / "org" / "other"
    with pytest.raises(LocalTokenizerError, match="no tokenizer files for model 'org/missing'"):
        find_model_dir(tmp_path, "org/missing")


def test_answers_are_cached_per_model_and_prompt(model_dir: Path) -> None:
    local = LocalTokenizers(model_dir, TokenCache())
    work = chat_work(CHATS[1])
    first = local.tokens("a", work)
    assert local.tokens("a", work) is first  # the same array: block keys found by identity
    assert local.runs == 1
    local.tokens("b", work)  # another model: its own entry (its own tokenizer in general)
    assert local.runs == 2


def test_config_refuses_local_without_model_files(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="tokenizer_path must be a folder"):
        RouterSettings(tokenizer="local")
    with pytest.raises(ValidationError, match="tokenizer_path: no tokenizer files for model 'org/x'"):
        RouterSettings(tokenizer="local", tokenizer_path=tmp_path, models=["org/x"])
    write_model(tmp_path / "org" / "x")
    assert RouterSettings(tokenizer="local", tokenizer_path=tmp_path, models=["org/x"]).tokenizer == "local"


def post_chat(url: str, chat: list[dict[str, Any]]) -> None:
    resp = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": chat, "max_tokens": 2})
    assert resp.status_code == 200, resp.text


def test_local_tokenizer_feeds_the_policy_without_a_round_trip(
    sims: list[Sim], router: RouterFactory, tmp_path: Path
) -> None:
    write_model(tmp_path / MODEL)
    r = router(engines=[sims[0].url], policy="cache_aware", tokenizer="local", tokenizer_path=tmp_path)
    for _ in range(3):
        post_chat(r.url, CHATS[1])
    expected = len(ModelTokenizer(tmp_path / MODEL).chat(CHATS[1]))
    assert r.metric("kvstack_router_prompt_tokens_total", policy="cache_aware") == 3 * expected
    assert r.metric("kvstack_router_tokenize_seconds_count", policy="cache_aware", source="local") == 3
    endpoint: Any = r.app.direct["/v1/chat/completions"]
    assert endpoint.prompts.engine_tokenizer is None  # no engine was ever asked
    assert endpoint.prompts.local.runs == 1  # tokenized once, then the cache


def test_missing_model_files_fall_back_to_the_engines_tokenize(
    sims: list[Sim], router: RouterFactory, tmp_path: Path
) -> None:
    r = router(engines=[sims[0].url], policy="cache_aware", tokenizer="local", tokenizer_path=tmp_path)
    post_chat(r.url, CHATS[0])
    assert r.metric("kvstack_router_tokenize_seconds_count", policy="cache_aware", source="engine") == 1
