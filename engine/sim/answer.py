"""The text of one generation as the engine core's outputs arrive, and what the response reports of it.

Every generating route (completions, chat, responses, messages, audio) reads its request's outputs
the same way: each output's new tokens are counted and decoded (a UTF-8 character split across two
outputs waits for its rest; whatever is left is flushed with the final output), and the request's
cached prompt tokens are remembered once the core reports them. With stop strings, the text is
held back until it cannot be the start of one; when one matches, the answer ends there with
finish reason "stop" and ``stop_reason`` the string, and the caller aborts the request in the core
as "stop" (vLLM's output processor ends it so too).
"""

from __future__ import annotations

from kvstack.engine.sim import protocol as p
from kvstack.engine.sim.types import RequestOutput


class Answer:
    """One request's generated text, counts and finish reason, fed output by output."""

    __slots__ = ("_detok", "_matcher", "cached", "finish", "generated", "stop_reason")

    def __init__(self, stops: tuple[str, ...] = (), include_stop: bool = False) -> None:
        self._detok = p.Detokenizer()
        self._matcher = p.StopMatcher(stops, include_stop) if stops else None
        self.generated = 0  # tokens the engine generated, a stop string's included
        self.cached = 0  # prompt tokens served from cache, once the core reports them
        self.finish = "abort"  # until the engine finishes the request or a stop string matches
        self.stop_reason: str | None = None

    @property
    def done(self) -> bool:
        """The answer is complete: the engine finished it or a stop string matched."""
        return self.finish != "abort"

    def take(self, out: RequestOutput) -> str:
        """The text ``out`` releases to the client: all of it but a possible stop string's start."""
        self.generated += len(out.new_token_ids)
        self.cached = out.num_cached_tokens or self.cached
        text = self._detok(out.new_token_ids)
        if out.finished:
            text += self._detok.flush()
        if self._matcher is not None:
            text = self._matcher.feed(text)
            if self._matcher.stop_reason is not None:
                self.finish, self.stop_reason = "stop", self._matcher.stop_reason
                return text
            if out.finished:
                text += self._matcher.flush()
        if out.finished:
            self.finish = out.finish_reason or "length"
        return text
