"""Benchmark workloads as data: sessions of chat turns with arrival times, built deterministically.

Three families, as the field benchmarks them (see shared/research/routing-peers.md §6):

* multi-round QA: users x rounds sharing one system prompt, each turn re-sending the growing history;
* shared-prefix groups: groups of prompts sharing a long system prompt, with short or long questions;
* long-document QA: documents queried repeatedly, in random or interleaved order.

Each is sized against the cluster's KV capacity (tokens): the *working set* is the number of distinct
prompt tokens a perfect cache would keep, and a regime fixes it as a fraction of that capacity
(``under`` <= 60%, ``pressured`` >= 70%). Text is made of one-token words (" abc"), so token counts are
exact under ``kvstack.common.tokenizer``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Regime = Literal["under", "pressured"]
REGIME_FILL: dict[Regime, float] = {"under": 0.5, "pressured": 0.8}
WORKLOADS = ("multi_round_qa", "shared_prefix", "long_doc_qa")

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def words(rng: random.Random, n_tokens: int) -> str:
    """``n_tokens`` one-token words (each " " + three lowercase letters)."""
    return "".join(" " + "".join(rng.choices(_LETTERS, k=3)) for _ in range(n_tokens))


@dataclass(frozen=True, slots=True)
class Turn:
    """One user message and the reply length asked for."""

    user: str
    max_tokens: int


@dataclass(slots=True)
class Session:
    """A conversation: turn k is sent with the system prompt and turns 0..k-1 with their real answers."""

    session_id: str
    system: str
    turns: list[Turn]
    start: float  # seconds after the run starts
    think_time: float = 0.0  # pause between an answer and the next turn


@dataclass(slots=True)
class Workload:
    name: str
    regime: Regime
    sessions: list[Session]
    working_set_tokens: int
    capacity_tokens: int
    notes: dict[str, float] = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)

    @property
    def fill(self) -> float:
        return self.working_set_tokens / self.capacity_tokens


def _poisson_starts(rng: random.Random, n: int, rate: float) -> list[float]:
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def multi_round_qa(
    capacity_tokens: int,
    regime: Regime,
    *,
    rounds: int = 5,
    system_tokens: int = 1000,
    question_tokens: int = 100,
    answer_tokens: int = 100,
    session_rate: float = 2.0,
    think_time: float = 0.5,
    seed: int = 0,
) -> Workload:
    """Users each hold a conversation; the number of users sets the working set."""
    rng = random.Random(seed)
    # The system prompt is shared, so only each user's history adds to the working set.
    history = rounds * (question_tokens + answer_tokens + 12)  # + template tokens per turn
    users = max(2, round((REGIME_FILL[regime] * capacity_tokens - system_tokens) / history))
    # One shared system prompt, as a product would: the per-user history is what grows.
    system = words(rng, system_tokens)
    starts = _poisson_starts(rng, users, session_rate)
    sessions = [
        Session(
            session_id=f"user-{u}",
            system=system,
            turns=[Turn(words(rng, question_tokens), answer_tokens) for _ in range(rounds)],
            start=starts[u],
            think_time=think_time,
        )
        for u in range(users)
    ]
    working = system_tokens + users * history
    return Workload("multi_round_qa", regime, sessions, working, capacity_tokens, {"users": users})


def shared_prefix(
    capacity_tokens: int,
    regime: Regime,
    *,
    prompts_per_group: int = 8,
    system_tokens: int = 2000,
    question_tokens: int = 64,
    answer_tokens: int = 64,
    request_rate: float = 16.0,
    seed: int = 1,
) -> Workload:
    """Groups share a long system prompt; each request is a one-turn session with its own question."""
    rng = random.Random(seed)
    groups = max(2, round(REGIME_FILL[regime] * capacity_tokens / system_tokens))
    systems = [words(rng, system_tokens) for _ in range(groups)]
    n = groups * prompts_per_group
    starts = _poisson_starts(rng, n, request_rate)
    order = [g for g in range(groups) for _ in range(prompts_per_group)]
    rng.shuffle(order)
    sessions = [
        Session(f"req-{i}", systems[g], [Turn(words(rng, question_tokens), answer_tokens)], starts[i])
        for i, g in enumerate(order)
    ]
    return Workload(
        "shared_prefix", regime, sessions, groups * system_tokens, capacity_tokens, {"groups": groups}
    )


def long_doc_qa(
    capacity_tokens: int,
    regime: Regime,
    *,
    doc_tokens: int = 6000,
    queries_per_doc: int = 4,
    question_tokens: int = 32,
    answer_tokens: int = 32,
    request_rate: float = 6.0,
    order: Literal["random", "interleave"] = "random",
    seed: int = 2,
) -> Workload:
    """Documents queried repeatedly; ``interleave`` cycles through all documents each pass."""
    rng = random.Random(seed)
    docs = max(2, round(REGIME_FILL[regime] * capacity_tokens / doc_tokens))
    texts = [words(rng, doc_tokens) for _ in range(docs)]
    if order == "interleave":
        sequence = [d for _ in range(queries_per_doc) for d in range(docs)]
    else:
        sequence = [d for d in range(docs) for _ in range(queries_per_doc)]
        rng.shuffle(sequence)
    starts = _poisson_starts(rng, len(sequence), request_rate)
    sessions = [
        Session(f"q-{i}", texts[d], [Turn(words(rng, question_tokens), answer_tokens)], starts[i])
        for i, d in enumerate(sequence)
    ]
    return Workload("long_doc_qa", regime, sessions, docs * doc_tokens, capacity_tokens, {"docs": docs})


def build(name: str, capacity_tokens: int, regime: Regime, *, scale: float = 1.0) -> Workload:
    """A named workload; ``scale`` < 1 shrinks prompt sizes for quick runs."""
    s = max(scale, 0.05)
    if name == "multi_round_qa":
        return multi_round_qa(
            capacity_tokens,
            regime,
            system_tokens=int(1000 * s),
            question_tokens=int(100 * s),
            answer_tokens=max(8, int(100 * s)),
        )
    if name == "shared_prefix":
        return shared_prefix(
            capacity_tokens, regime, system_tokens=int(2000 * s), question_tokens=max(8, int(64 * s))
        )
    if name == "long_doc_qa":
        return long_doc_qa(capacity_tokens, regime, doc_tokens=int(6000 * s))
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def oracle_hit_tokens(
    prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], block_size: int
) -> list[int]:
    """Hit tokens per request for one engine with an unlimited cache, in the order given.

    Mirrors vLLM: only full blocks hit, the last prompt token is always recomputed, and the blocks of a
    request's prompt plus its generated tokens are cached once it finishes.
    """
    from kvstack.common.blocks import block_keys

    seen: set[int] = set()
    hits: list[int] = []
    for prompt, output in zip(prompts, outputs, strict=True):
        usable = (len(prompt) - 1) // block_size
        keys = block_keys(prompt, block_size, 0, max_blocks=usable)
        n = 0
        for key in keys:
            if key not in seen:
                break
            n += 1
        hits.append(n * block_size)
        seen.update(block_keys([*prompt, *output], block_size, 0))
    return hits
