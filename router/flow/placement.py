"""Whether a request goes to the saturated engine holding its prefix rather than to one with room. Pure.

Late binding routes a request among the engines with room. When the engine holding the longest
cached prefix of its prompt is saturated only by a prefill backlog (the one wait the router can
estimate: its uncached tokens sent and not yet prefilled, at its rate), sending it there anyway can
beat a cold prefill elsewhere: its first token comes after that backlog and the little left
uncached, against the other engine's backlog and the larger part it does not hold. The request goes
to the hit engine when that is expected sooner; any other saturation (its batch full, requests
waiting in it, KV full) has no wait to weigh, so it is never chosen then.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Option:
    """One engine for the request: its cached prefix of the prompt, its backlog and rate."""

    hit_tokens: float
    backlog_tokens: float
    tokens_per_s: float

    def ttft_s(self, prompt_tokens: float) -> float:
        """Expected time to the first token there: its backlog, then what it does not hold."""
        return (self.backlog_tokens + max(0.0, prompt_tokens - self.hit_tokens)) / self.tokens_per_s


def prefer_hit_engine(prompt_tokens: float, hit: Option, free: Option, only_backlog: bool) -> bool:
    """Send to the saturated ``hit`` engine instead of the best one with room (``free``): when its
    saturation is a prefill backlog only (``only_backlog``), it holds more of the prompt, and its
    expected first token comes sooner."""
    if (
        not only_backlog
        or hit.hit_tokens <= free.hit_tokens
        or hit.tokens_per_s <= 0
        or free.tokens_per_s <= 0
    ):
        return False
    return hit.ttft_s(prompt_tokens) < free.ttft_s(prompt_tokens)
