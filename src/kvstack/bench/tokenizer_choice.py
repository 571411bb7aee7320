"""Whether a benchmark's router tokenizer can match its engines' token ids. Pure.

The router's KV index matches the block hashes it computes from its own token ids against the
engines' KV events, which the engines hash from theirs. The simulators tokenize with the built-in
tokenizer only, so a router tokenizing with a model's files (``--tokenizer local``) in front of
them computes ids they never produce: nothing it predicts is ever confirmed by an event, and its
only "hits" are its own dispatches' speculative entries, kept ``speculative_ttl_s`` (2 s). A shared
system prompt then looks cached wherever a request went in the last two seconds, a session's own
context never does, and a multi-round benchmark measures a router that cannot see its sessions
(found in session 26: four simulators at load 0.9, kvstack moved 27-37 of 85 turns off the engine
holding them and its TTFT p90 was 3.7-6.8 s against SGLang's 0.5-0.85 s). ``builtin`` and
``engine`` (the simulators' ``/tokenize``) match them.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from kvstack.bench.option_error import OptionError
from kvstack.router.config import TokenizerKind

TOKENIZERS: tuple[str, ...] = get_args(TokenizerKind)  # the router's own choices


class TokenizerChoiceError(OptionError):
    """A tokenizer choice the benchmark cannot run; ``option`` names the flag to change."""


def check_tokenizer(tokenizer: str, tokenizer_path: Path | None, *, simulated: bool) -> None:
    """Raise :class:`TokenizerChoiceError` unless ``tokenizer`` can give the engines' own ids:
    a known name, a folder for ``local``, and not ``local`` in front of simulators."""
    if tokenizer not in TOKENIZERS:
        raise TokenizerChoiceError(
            "--tokenizer", f"unknown tokenizer {tokenizer!r}; one of {', '.join(TOKENIZERS)}"
        )
    if tokenizer != "local":
        return
    if simulated:
        raise TokenizerChoiceError(
            "--tokenizer",
            "the simulators tokenize with the built-in tokenizer, so a local tokenizer's ids never "
            "match their KV events (the index would see no session); use --tokenizer builtin or engine",
        )
    if tokenizer_path is None or not tokenizer_path.is_dir():
        raise TokenizerChoiceError(
            "--tokenizer-path", "--tokenizer local needs the model's tokenizer files (a folder)"
        )
