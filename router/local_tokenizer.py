"""Prompt token ids from the model's own tokenizer files, in the router (``tokenizer: local``).

vLLM prefills what its HF tokenizer makes of the prompt, and its KV events carry those ids; block
keys match only when the router makes the same ids. ``tokenizer: engine`` asks an engine's
``/tokenize`` for them (a round trip per new prompt); this module makes them here, from the files
vLLM itself loads:

* ``tokenizer.json``, run by the HF ``tokenizers`` library (the Rust code behind transformers'
  fast tokenizers, so the ids are the same by construction);
* the chat template (``tokenizer_config.json``'s ``chat_template``, a named ``default`` one, or
  ``chat_template.jinja``), rendered with jinja2 the way transformers' ``apply_chat_template`` does:
  a sandboxed environment with ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``
  and ``strftime_now``, the special tokens (``bos_token``, ...) as variables.

What each vLLM 0.24 endpoint renders (the same fields :mod:`.tokenizers` sends to ``/tokenize``):
a chat is the template with ``add_generation_prompt=True``, encoded *without* special tokens (the
template writes the BOS itself); a text prompt is encoded *with* them (the post-processor's BOS).
A content array's text parts are joined with newlines, as vLLM does for string-content templates.

Files are found under one root (:func:`find_model_dir`): a model folder itself, ``<root>/<model>``,
or the HF Hub cache layout (``models--org--name/snapshots/<rev>``, also under ``hub/``), the one
the chart's model volume holds. Nothing is downloaded.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from kvstack.common.token_cache import TokenCache, Tokens
from kvstack.router.prompts import PromptWork, engine_key, message_text

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


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


def chat_template_of(config: Mapping[str, Any], model_dir: Path) -> str | None:
    """The model's chat template: the config's (the ``default`` of named ones), or the .jinja file."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    path = model_dir / TEMPLATE_FILE
    return path.read_text() if path.is_file() else None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_template(source: str) -> Callable[..., str]:
    """The template as transformers compiles chat templates (same environment, filters, globals)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    template = env.from_string(source)
    return template.render


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as vLLM hands them to a string-content template: content arrays as their joined text."""
    out: list[dict[str, Any]] = []
    for m in messages:
        content = m.get("content")
        out.append(dict(m) if not isinstance(content, list) else {**m, "content": message_text(content)})
    return out


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
        self.special_tokens = {
            k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None
        }
        source = chat_template_of(config, model_dir)
        self._render = compile_template(source) if source is not None else None

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

    def encode(self, text: str, *, add_special_tokens: bool, release_gil: bool = False) -> Tokens:
        """Token ids of ``text``. ``release_gil``: through ``encode_batch``, which lets other threads
        run while Rust encodes (plain ``encode`` holds the GIL throughout)."""
        if release_gil:
            (encoding,) = self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)
        else:
            encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return array("I", encoding.ids)

    def chat(self, messages: Sequence[Mapping[str, Any]], *, release_gil: bool = False) -> Tokens:
        """What vLLM's /v1/chat/completions prefills: the rendered chat, no special tokens added."""
        return self.encode(self.render_chat(messages), add_special_tokens=False, release_gil=release_gil)

    def text(self, prompt: str, *, release_gil: bool = False) -> Tokens:
        """What vLLM's /v1/completions prefills: the text with the special tokens (the BOS)."""
        return self.encode(prompt, add_special_tokens=True, release_gil=release_gil)

    def tokens(self, work: PromptWork, *, release_gil: bool = False) -> Tokens:
        if work.messages is not None:
            return self.chat(work.messages, release_gil=release_gil)
        return self.text(work.text or "", release_gil=release_gil)


class LocalTokenizers:
    """The models' tokenizers under one root, loaded on first use; answers kept in ``cache``
    under :func:`~kvstack.router.prompts.engine_key` (the same ids an engine's ``/tokenize`` gives)."""

    def __init__(self, root: Path, cache: TokenCache) -> None:
        self.root = root
        self.cache = cache
        self._models: dict[str, ModelTokenizer] = {}
        self.runs = 0  # prompts tokenized (cache misses)

    def for_model(self, model: str) -> ModelTokenizer:
        found = self._models.get(model)
        if found is None:
            found = self._models[model] = ModelTokenizer(find_model_dir(self.root, model))
        return found

    def cached(self, model: str, work: PromptWork) -> Tokens | None:
        """``work``'s tokens for ``model`` when the cache holds them."""
        return self.cache.find(engine_key(model, work))

    def remember(self, model: str, work: PromptWork, tokens: Tokens) -> Tokens:
        """Keep tokens made by :meth:`for_model`'s tokenizer (here or in a thread) in the cache."""
        self.runs += 1
        return self.cache.put(engine_key(model, work), tokens)

    def tokens(self, model: str, work: PromptWork) -> Tokens:
        """``work``'s tokens as ``model``'s engines prefill them, cached."""
        found = self.cached(model, work)
        return found if found is not None else self.remember(model, work, self.for_model(model).tokens(work))
