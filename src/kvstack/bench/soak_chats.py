"""Real-size chats for ``kvstack bench soak --workload chat``: many users, histories that grow.

What made the router's RSS climb on four vLLM engines was prompts of real size on the
engine-tokenizer path: 3-5K-token chats, each user's history one turn longer than its last request.
This workload reproduces that shape on simulators. Every user belongs to one of ``groups`` teams
whose system prompt it shares, has a document of its own, and sends ``turns`` requests per
conversation, each resending the whole history plus a new question, before starting a new
conversation (a new document). Request ``i`` is turn ``i // users`` of user ``i % users``, so every
prompt is new (each is tokenized, every cache keyed by content fills) while its start is shared
(the block index, the key caches and the message cache see realistic prefix reuse).

Texts are pseudo-English from a fixed word list: the built-in tokenizer makes about
:data:`TOKENS_PER_WORD` tokens per word, so the sizes below are in tokens. Pure and deterministic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

_VOCABULARY = (
    "the cache router engine prefill decode block token request latency throughput memory GPU "
    "cluster node pod replica queue batch stream prompt model weights tensor kernel schedule "
    "evict store load hit miss shared prefix history session user answer question document "
    "system team platform inference serving budget bytes index key value chunk layer "
    "attention we measured that every long conversation keeps its earlier turns so the next "
    "request starts where the last one ended and only new tokens need a prefill on the chosen "
    "engine when two users ask about one report their prompts share a document and a system "
    "prompt operators watch dashboards alerts and logs while autoscaling adds capacity for "
    "bursts"
)
_WORDS = tuple(_VOCABULARY.split())
TOKENS_PER_WORD = 2.1  # the built-in tokenizer on these words (tests/bench/test_soak.py checks it)


@dataclass(frozen=True, slots=True)
class ChatWorkload:
    """The shape of the conversations (sizes in tokens)."""

    users: int = 240
    groups: int = 8  # teams: users of a team share a system prompt
    system_tokens: int = 1000
    document_tokens: int = 2000
    question_tokens: int = 60
    answer_tokens: int = 240
    turns: int = 6  # requests per conversation; then the user starts a new one

    def prompt_tokens(self, turn: int) -> int:
        """About how many tokens the prompt of a conversation's ``turn`` (0-based) has."""
        return (
            self.system_tokens
            + self.document_tokens
            + turn * (self.question_tokens + self.answer_tokens)
            + self.question_tokens
        )


@lru_cache(maxsize=8192)
def text(kind: str, seed: tuple[int, ...], tokens: int) -> str:
    """Deterministic pseudo-English of about ``tokens`` tokens, one text per (kind, seed)."""
    rng = random.Random(f"{kind}:{seed}")
    return " ".join(rng.choices(_WORDS, k=max(1, round(tokens / TOKENS_PER_WORD))))


def chat_messages(i: int, w: ChatWorkload) -> list[dict[str, str]]:
    """The messages of request ``i``: its user's system prompt, document and history so far."""
    user, n = i % w.users, i // w.users
    conv, turn = divmod(n, w.turns)
    messages = [
        {"role": "system", "content": text("system", (user % w.groups,), w.system_tokens)},
        {"role": "user", "content": text("document", (user, conv), w.document_tokens)},
    ]
    for k in range(turn):
        messages.append({"role": "user", "content": text("question", (user, conv, k), w.question_tokens)})
        messages.append({"role": "assistant", "content": text("answer", (user, conv, k), w.answer_tokens)})
    messages.append({"role": "user", "content": text("question", (user, conv, turn), w.question_tokens)})
    return messages


def chat_body(i: int, w: ChatWorkload, max_tokens: int, stream: bool) -> dict[str, Any]:
    """The request body of request ``i`` (its user as the OpenAI ``user`` field)."""
    return {
        "model": "sim",
        "messages": chat_messages(i, w),
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
        "user": f"user-{i % w.users}",
    }
