"""The routing-policy interface: a decision from request features and engine states, no I/O.

Every policy subclasses :class:`Policy`. It must define ``name`` and :meth:`Policy.choose`; every
other hook is declared here with a default that does nothing, so the proxy and the app call each
one unconditionally and a policy overrides only what it uses:

* per request, in order: ``choose``, ``on_dispatch`` (sent), ``on_first_token`` (a stream's prefill
  is over), ``on_finish`` (ended in any way, always called once after ``on_dispatch``);
* lifecycle, once per router: ``start`` before the first request, ``stop`` at shutdown (background
  work such as KV-event subscribers lives there, never in ``__init__``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from kvstack.router.engines import EngineState


class ExpectedHit(NamedTuple):
    """An engine's expected cache hit for one request."""

    tokens: float  # prompt tokens it saves computing (tier-weighted)
    load_s: float = 0.0  # seconds its LMCache loads take beyond computing the tokens loaded (Redis)


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
    cache_salt: str | None = None
    max_tokens: int | None = None
    # The prompt as text, for text-based policies (prefix_trie): a completion's prompt, or a chat's
    # message contents joined with "\n", as vLLM production-stack hashes them. None when not asked.
    prompt_text: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The chosen engine and why (the reason becomes a metric label and a log field)."""

    engine: EngineState
    reason: str = "policy"
    predicted_hit_tokens: int = 0


# a shared device's engines' speed relative to alone with 2, 3, ... busy, given the configured prior
DeviceSpeeds = Callable[[str, tuple[float, ...]], tuple[float, ...]]


class Policy(ABC):
    """A routing policy. ``candidates`` is non-empty: available engines serving the model.

    The hooks below are empty on purpose (defaults a policy may override), hence ``noqa: B027``.
    """

    name: ClassVar[str]
    needs_tokens: ClassVar[bool] = False  # the proxy tokenizes the prompt only for policies that ask
    needs_text: ClassVar[bool] = False  # ... and fills ``prompt_text`` only for those that ask

    @abstractmethod
    def choose(self, request: RequestFeatures, candidates: Sequence[EngineState], now: float) -> Decision:
        """Pick one of ``candidates``. Must be fast (microseconds) and must not block."""

    def expected_hit(
        self, request: RequestFeatures, candidates: Sequence[EngineState], now: float
    ) -> ExpectedHit:
        """What the best of ``candidates`` is expected to hold of the prompt in its cache (no side
        effects): flow control's estimate of a request's prefill cost before it is routed."""
        return ExpectedHit(0.0)

    def use_prefill_rates(  # noqa: B027
        self, rate: Callable[[EngineState], float], speeds: DeviceSpeeds | None = None
    ) -> None:
        """Where the policy prices prefill, use ``rate(engine)``: an engine's prefill tokens/s as
        the router learns it, and ``speeds(device, prior)`` (when given): how a shared device slows
        its engines as more are busy (flow control's: :class:`kvstack.router.flow.room.Room`)."""

    # ---- per-request hooks

    def on_dispatch(self, request: RequestFeatures, decision: Decision) -> None:  # noqa: B027
        """The request was sent to ``decision.engine``."""

    def on_first_token(self, request: RequestFeatures, decision: Decision) -> None:  # noqa: B027
        """The first generated token of a stream reached the router: the engine's prefill is over."""

    def on_finish(self, request: RequestFeatures, decision: Decision, ok: bool) -> None:  # noqa: B027
        """The request ended (completed, failed or aborted); ``ok`` when the engine did its part."""

    # ---- lifecycle

    async def start(self) -> None:  # noqa: B027
        """Start background work (called once, inside the event loop, before the first request)."""

    async def stop(self) -> None:  # noqa: B027
        """Stop what :meth:`start` started (called once at shutdown)."""

    def syncing(self) -> list[str]:
        """URLs of engines whose state the policy is still catching up on (their KV-event history);
        the router is not ready while an available one is (router/readiness.py)."""
        return []
