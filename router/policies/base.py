"""The routing-policy interface: a decision from request features and engine states, no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvstack.router.engines import EngineState


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    """What a policy may know about a request. Built by the proxy before routing."""

    model: str
    request_id: str
    session_key: str | None = None  # from the session header or the OpenAI `user` field
    prompt_token_ids: Sequence[int] | None = None  # set when the policy asks for tokens (cache-aware)
    # The prompt's length in tokens when ``prompt_token_ids`` holds only its start (a new chat turn
    # whose last messages are tokenized after routing); None: ``prompt_token_ids`` is the whole prompt.
    prompt_len: int | None = None
    lora_name: str | None = None
    cache_salt: str | None = None
    max_tokens: int | None = None
    extra: dict[str, str] = field(default_factory=dict)
    # The prompt as text, for text-based policies (prefix_trie): a completion's prompt, or a chat's
    # message contents joined with "\n", as vLLM production-stack hashes them. None when not asked.
    prompt_text: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The chosen engine and why (the reason becomes a metric label and a log field)."""

    engine: EngineState
    reason: str = "policy"
    predicted_hit_tokens: int = 0


class Policy(Protocol):
    """Routing policy. ``candidates`` is non-empty: available engines serving the model."""

    name: str
    needs_tokens: bool  # the proxy tokenizes the prompt only for policies that ask

    def choose(self, request: RequestFeatures, candidates: Sequence[EngineState], now: float) -> Decision:
        """Pick one of ``candidates``. Must be fast (microseconds) and must not block."""
        ...

    def on_dispatch(self, request: RequestFeatures, decision: Decision) -> None:
        """Called after the request was sent to ``decision.engine``."""

    def on_finish(self, request: RequestFeatures, decision: Decision, ok: bool) -> None:
        """Called when the request ended (completed, failed or aborted)."""
