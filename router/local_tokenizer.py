"""Prompt token ids from the model's own tokenizer files, in the router (``tokenizer: local``).

vLLM prefills what its HF tokenizer makes of the prompt, and its KV events carry those ids; block
keys match only when the router makes the same ids. ``tokenizer: engine`` asks an engine's
``/tokenize`` for them (a round trip per new prompt); this module makes them here, from the files
vLLM itself loads:

* ``tokenizer.json``, run by the HF ``tokenizers`` library (the Rust code behind transformers'
  fast tokenizers, so the ids are the same by construction);
* the chat template (``tokenizer_config.json``'s ``chat_template``, a named ``default`` one, or
  ``chat_template.jinja``), rendered with jinja2 the way transformers' ``apply_chat_template`` does
  (:mod:`.chat_template`), the special tokens (``bos_token``, ...) as variables.

What each vLLM 0.24 endpoint renders (the same fields :mod:`.tokenizers` sends to ``/tokenize``):
a chat is the template with ``add_generation_prompt=True``, encoded *without* special tokens (the
template writes the BOS itself); a text prompt is encoded *with* them (the post-processor's BOS).
A content array's text parts are joined with newlines, as vLLM does for string-content templates.

A long chat is re-sent whole every turn, and encoding ~7,000 tokens costs the router ~10 ms of
CPU per request. HF ``tokenizers`` first cuts the text at its added (special) tokens and runs the
normalizer, pre-tokenizer and model on each piece on its own, so the ids of a chat are the ids of
its pieces end to end. When the tokenizer's settings guarantee that
(:func:`~kvstack.router.tokenizer_pieces.piece_refusal`), the rendered chat is cut at those tokens
(:func:`~kvstack.router.tokenizer_pieces.chat_pieces`) and each piece's ids are kept in a
:class:`~kvstack.common.token_cache.TokenCache`: a new turn encodes only its new message, and a new
user's long system message only what follows the start it shares with others
(:mod:`~kvstack.router.tokenizer_starts`). The first chats of each model, then its first chats cut
after a shared start, are also encoded whole and compared (:meth:`LocalTokenizers.check`); a
difference turns the pieces (or the cuts) off. The router does that comparison after the request is sent: it
doubled the routing time of a new user's first turn (~20 ms of an H200 run's TTFT), and a
difference costs at most the placement of the few requests checked meanwhile.

Files are found under one root (:func:`find_model_dir`): a model folder itself, ``<root>/<model>``,
or the HF Hub cache layout (``models--org--name/snapshots/<rev>``, also under ``hub/``), the one
the chart's model volume holds. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import Tokenizer

from kvstack.common.token_cache import TokenCache, Tokens, digest
from kvstack.router.chat_template import chat_template_of, compile_template, template_messages
from kvstack.router.prompts import PromptWork, engine_key
from kvstack.router.tokenizer_pieces import ChatPlan, added_token_pattern, chat_pieces, piece_refusal
from kvstack.router.tokenizer_starts import SharedStarts, start_refusal

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# HF tokenizers runs ``encode_batch`` on a rayon pool of one thread per core, even for a batch of one
# text: the router's encodes then wake a pool thread and the rest spin for work. On a 16-core GPU host
# that was ~1 ms of CPU a request, 9 % of the router's (bench-results/router, "The tokenizer's thread
# pool"). The router encodes one prompt at a time, so the pool buys nothing. Set before any encode;
# an operator's own setting stands.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
VERIFY_CHATS = 4  # chats per model encoded both ways before the pieces are trusted alone
VERIFY_CUTS = 4  # the same for the first chats with a piece cut after a shared start
_PIECE = b"kvstack.local-piece"

log = logging.getLogger(__name__)


class LocalTokenizerError(Exception):
    """The model's tokenizer files are missing or unusable, or its template refused the messages."""


def _hub_snapshot(repo_dir: Path) -> Path | None:
    """The snapshot ``refs/main`` names, else the only snapshot holding a tokenizer."""
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snapshot = repo_dir / "snapshots" / ref.read_text().strip()
        if (snapshot / TOKENIZER_FILE).is_file():
            return snapshot
    found = sorted(p.parent for p in (repo_dir / "snapshots").glob(f"*/{TOKENIZER_FILE}"))
    return found[0] if len(found) == 1 else None


def find_model_dir(root: Path, model: str) -> Path:
    """The folder holding ``model``'s tokenizer files under ``root``; the places looked at otherwise."""
    candidates = [root, root / model]
    for hub in (root, root / "hub"):
        repo_dir = hub / ("models--" + model.replace("/", "--"))
        if repo_dir.is_dir():
            snapshot = _hub_snapshot(repo_dir)
            if snapshot is not None:
                return snapshot
            candidates.append(repo_dir / "snapshots/<revision>")
    for folder in candidates[:2]:
        if (folder / TOKENIZER_FILE).is_file():
            return folder
    looked = ", ".join(str(p / TOKENIZER_FILE) for p in candidates)
    raise LocalTokenizerError(
        f"no tokenizer files for model {model!r} under {root} (looked for {looked}, and the HF Hub "
        f"cache layout models--{model.replace('/', '--')}/snapshots/)"
    )


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken's fields."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class ModelTokenizer:
    """One model's tokenizer and chat template, loaded from its folder."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        try:
            self._tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
            config_path = model_dir / CONFIG_FILE
            config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except Exception as err:  # tokenizers raises plain Exception for a bad file
            raise LocalTokenizerError(f"cannot load the tokenizer in {model_dir}: {err}") from None
        # transformers turns off whatever truncation or padding tokenizer.json was saved with
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        spec = json.loads(self._tokenizer.to_str())
        self.piece_refusal = piece_refusal(spec)
        self.piece_pattern = (
            added_token_pattern([str(t.get("content", "")) for t in spec.get("added_tokens") or []])
            if self.piece_refusal is None
            else None
        )
        # the starts long pieces share (a system prompt before each user's own text), learnt
        cuts_refused = self.piece_refusal or start_refusal(spec)
        self.starts = SharedStarts() if cuts_refused is None else None
        self.special_tokens = {
            k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None
        }
        source = chat_template_of(config, model_dir)
        self._render = compile_template(source) if source is not None else None

    @property
    def has_template(self) -> bool:
        return self._render is not None

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat as the template writes it (transformers' ``apply_chat_template(tokenize=False)``)."""
        if self._render is None:
            raise LocalTokenizerError(f"the tokenizer in {self.model_dir} has no chat template")
        try:
            return self._render(
                messages=template_messages(messages),
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special_tokens,
            )
        except jinja2.TemplateError as err:
            raise LocalTokenizerError(f"the chat template refused the messages: {err}") from None

    def encode(self, text: str, *, add_special_tokens: bool) -> Tokens:
        """Token ids of ``text`` (:meth:`encode_all` of one text)."""
        return self._encode([text], add_special_tokens=add_special_tokens)[0]

    def encode_all(self, texts: Sequence[str]) -> list[Tokens]:
        """Ids of each of ``texts`` (pieces of a chat: no special tokens added); thread-safe."""
        return self._encode(texts, add_special_tokens=False) if texts else []

    def _encode(self, texts: Sequence[str], *, add_special_tokens: bool) -> list[Tokens]:
        # ``encode_batch_fast``: the same ids without the character offsets nobody here reads, 20-30 %
        # less CPU than ``encode`` from 30 to 3,000 words (issue #20: on an H100 the router's local
        # tokenization was ~40 % of its Python CPU on multi-round chat, bench-results/router), and it
        # lets other threads run while Rust encodes, so a long prompt can go to a thread
        encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)
        return [array("I", e.ids) for e in encodings]

    def chat(self, messages: Sequence[Mapping[str, Any]]) -> Tokens:
        """What vLLM's /v1/chat/completions prefills: the rendered chat, no special tokens added."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)

    def text(self, prompt: str) -> Tokens:
        """What vLLM's /v1/completions prefills: the text with the special tokens (the BOS)."""
        return self.encode(prompt, add_special_tokens=True)

    def tokens(self, work: PromptWork) -> Tokens:
        if work.messages is not None:
            return self.chat(work.messages)
        return self.text(work.text or "")


@dataclass(slots=True)
class _Checks:
    """One model's checks of pieces against the whole text: those left to hand out, first to any
    chat, then to chats cut after a shared start; and how many cut chats have passed one."""

    chats: int = VERIFY_CHATS
    cuts: int = VERIFY_CUTS
    cuts_passed: int = 0

    def take(self, cut: bool) -> bool:
        """Whether a chat (``cut``: cut after a shared start) is to be checked, taking that check."""
        if self.chats > 0:
            self.chats -= 1
            return True
        if cut and self.cuts > 0:
            self.cuts -= 1
            return True
        return False


class LocalTokenizers:
    """The models' tokenizers under one root, loaded on first use; answers kept in ``cache``
    under :func:`~kvstack.router.prompts.engine_key` (the same ids an engine's ``/tokenize`` gives),
    a chat's pieces in ``pieces`` (the router passes its rendered-messages cache).

    A chat goes :meth:`plan` (render, cut, look up; on the event loop), :meth:`encode` (the
    missing pieces; thread-safe, so a long one may run in a thread), :meth:`finish` (cache, join).
    """

    def __init__(self, root: Path, cache: TokenCache, pieces: TokenCache | None = None) -> None:
        self.root = root
        self.cache = cache
        self.pieces = pieces if pieces is not None else cache
        self._models: dict[str, ModelTokenizer] = {}
        self._checks: dict[str, _Checks] = {}  # per model: its chats still to encode whole as well
        self.runs = 0  # prompts tokenized (cache misses)
        self.piece_runs = 0  # chat pieces encoded (piece cache misses)

    @property
    def loaded(self) -> frozenset[str]:
        """The models whose tokenizers are loaded."""
        return frozenset(self._models)

    def for_model(self, model: str) -> ModelTokenizer:
        found = self._models.get(model)
        if found is None:
            found = self._models[model] = ModelTokenizer(find_model_dir(self.root, model))
            self._checks[model] = _Checks()
            if found.piece_refusal is not None:
                log.info("%s: chats are encoded whole (%s)", model, found.piece_refusal)
        return found

    def cached(self, model: str, work: PromptWork) -> Tokens | None:
        """``work``'s tokens for ``model`` when the cache holds them."""
        return self.cache.find(engine_key(model, work))

    def remember(self, model: str, work: PromptWork, tokens: Tokens) -> Tokens:
        """Keep tokens made by :meth:`for_model`'s tokenizer (here or in a thread) in the cache."""
        self.runs += 1
        return self.cache.put(engine_key(model, work), tokens)

    def warm(self, model: str) -> None:
        """Load ``model``'s tokenizer and run its template and encoder once, so the first request
        does not pay for it (~170 ms for a 32K-token vocabulary). Raises :class:`LocalTokenizerError`."""
        tokenizer = self.for_model(model)
        if tokenizer.has_template:
            with contextlib.suppress(LocalTokenizerError):  # a template may refuse a lone user turn
                tokenizer.chat([{"role": "user", "content": "warm"}])
        tokenizer.text("warm")

    def plan(self, model: str, work: PromptWork) -> ChatPlan | None:
        """A chat's pieces and the ids the cache holds for them; None for a text prompt, or when
        the model's tokenizer cannot be cut into pieces. A piece the cache lacks is cut after a
        start it shares with other pieces, when there is one. A plan marked ``verify`` takes one of
        the model's checks: its caller passes the whole text's ids to :meth:`check`."""
        tokenizer = self.for_model(model)
        if work.messages is None or tokenizer.piece_pattern is None:
            return None
        text = tokenizer.render_chat(work.messages)
        plan = ChatPlan(text, [], [], [], verify=False)
        for piece in chat_pieces(text, tokenizer.piece_pattern):
            key = digest(_PIECE, (model, piece))
            found = self.pieces.find(key)
            parts = None if found is not None or tokenizer.starts is None else tokenizer.starts.split(piece)
            if parts is None:
                plan.add(piece, key, found)
                continue
            start, rest = parts
            plan.cut = True
            start_key = digest(_PIECE, (model, start))
            plan.add(start, start_key, self.pieces.find(start_key))
            rest_key = digest(_PIECE, (model, rest))
            rest_found = self.pieces.find(rest_key)
            if rest_found is None and self._checks[model].cuts_passed >= VERIFY_CUTS:
                plan.add(rest, key, None, start=len(plan.pieces) - 1)  # trusted: cached as the whole piece
            else:  # until then under its own key, so a wrong cut never stands for the whole piece
                plan.add(rest, rest_key, rest_found)
        plan.verify = self._checks[model].take(plan.cut)
        return plan

    def encode(self, model: str, plan: ChatPlan) -> list[Tokens]:
        """Ids of the plan's missing pieces; touches no cache (safe in a thread)."""
        return self._models[model].encode_all(plan.missing())

    def finish(self, model: str, work: PromptWork, plan: ChatPlan, made: list[Tokens]) -> Tokens:
        """The chat's ids: its pieces' joined (the new ones cached)."""
        fresh = iter(made)
        out = array("I")
        ids: list[Tokens] = []
        for i, (key, found) in enumerate(zip(plan.keys, plan.found, strict=True)):
            if found is None:
                self.piece_runs += 1
                found = next(fresh)
                start = plan.rests.get(i)
                # a rest is cached as its whole piece: the next turn finds the piece uncut
                self.pieces.put(key, found if start is None else ids[start] + found)
            ids.append(found)
            out += found
        return self.remember(model, work, out)

    def whole(self, model: str, plan: ChatPlan) -> Tokens:
        """Ids of the plan's text encoded whole, for :meth:`check` (safe in a thread)."""
        return self._models[model].encode(plan.text, add_special_tokens=False)

    def check(self, model: str, work: PromptWork, plan: ChatPlan, joined: Tokens, whole: Tokens) -> Tokens:
        """Compare a chat's pieces' ids (:meth:`finish`) with its whole text's; when they differ,
        stop cutting this model's pieces after shared starts (the plan cut one), else stop cutting
        its chats at all, and keep the whole text's ids for ``work``. Returns the ids to trust.
        Until :data:`VERIFY_CUTS` cut chats have passed, a cut piece's ids are not cached as the
        whole piece's."""
        if joined == whole:
            if plan.cut:
                self._checks[model].cuts_passed += 1
            return joined
        tokenizer = self._models[model]
        if plan.cut:
            log.warning("%s: a piece cut after a shared start encodes differently; no more cuts", model)
            tokenizer.starts = None
        else:
            log.warning("%s: the chat's pieces encode differently from the whole; no more pieces", model)
            tokenizer.piece_pattern = None
        return self.cache.replace(engine_key(model, work), whole)

    def tokens(self, model: str, work: PromptWork) -> Tokens:
        """``work``'s tokens as ``model``'s engines prefill them, cached."""
        found = self.cached(model, work)
        if found is not None:
            return found
        plan = self.plan(model, work)
        if plan is None:
            return self.remember(model, work, self.for_model(model).tokens(work))
        joined = self.finish(model, work, plan, self.encode(model, plan))
        return self.check(model, work, plan, joined, self.whole(model, plan)) if plan.verify else joined
