"""Benchmark workloads as data: sessions of chat turns with arrival times, built deterministically.

Three families, as the field benchmarks them (vLLM production-stack, the SGLang router and llm-d
publish results on these):

* multi-round QA (production-stack ``multi-round-qa``): users x rounds sharing one system prompt,
  each user with a long user-specific context, each turn re-sending the growing history;
* shared-prefix groups (SGLang ``generated-shared-prefix``): groups of prompts sharing a long
  system prompt, each with its own short question;
* long-document QA (LMCache / vLLM ``long_doc_qa``): documents queried repeatedly, in random order
  (``long_doc_qa``) or interleaved (``long_doc_qa_interleave``: every document once per pass, the
  order in which an LRU cache that cannot hold them all loses every one).

Each is sized against the cluster's KV capacity (tokens): the *working set* is the number of distinct
prompt tokens a perfect cache would keep, and a regime fixes it as a fraction of that capacity
(``under`` <= 60%, ``pressured`` >= 70%; by default 50% and 90%). Text is made of one-token words
(" abc"), so token counts are exact under ``kvstack.common.tokenizer``.

Why 90% for ``pressured``: a load-blind policy that places each new prefix on a random engine (the
prefix trie) loses hits only when its draw overfills an engine. At 80% that takes an engine holding
about 12 of 35 documents or 17 of 52 groups, which a uniform draw gives about half the time
(multinomial estimate), so the regime measured the baseline's luck: both policies sit at the
cached-prefix floor when the draw fits. At 90% (39 documents, 59 groups) 84% and 90% of draws
overfill, which is the pressure the regime is for. ``--fill-pressured`` runs any fill in [0.7, 1.0].

Request rates are set by *load*: the prompt tokens offered per second as a fraction of the cluster's
cold prefill throughput (engines x ``prefill_tokens_per_s``). At ``load`` 0.75 a cluster that
caches nothing would be 75% busy prefilling, so a policy that loses its hits queues, as the field
benchmarks' QPS sweeps show past their knee, while one that keeps them stays light. Quick runs
(``scale`` < 1) keep the full run's request rate rather than raising it as prompts shrink.

Changes from the first version, and why (TTFT p90 could not tell policies apart):

* request rates were fixed (2-16 req/s) and engines were ~25% busy even with no cache hits, so every
  policy's p90 was one cold prefill and queueing never showed; rates now follow ``load``;
* shared-prefix groups had 8 prompts, so 12.5% of requests were their group's first and cold for any
  policy, which puts p90 on a cold prefill; groups now have 16 prompts, SGLang's default;
* long-document QA asked 4 questions per document (25% necessarily cold); now 8, between LMCache's
  repeat count of 2 and vLLM's 5 x ... variants, so p90 looks past the first read of each document;
* multi-round QA had no user-specific context, so a miss cost only a short history; production-stack
  gives each user a long context (20,000 tokens there, 2,000 here to fit the simulated KV).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Regime = Literal["under", "pressured"]
REGIME_FILL: dict[Regime, float] = {"under": 0.5, "pressured": 0.9}
WORKLOADS = ("multi_round_qa", "shared_prefix", "long_doc_qa", "long_doc_qa_interleave")

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _fill(regime: Regime, fill: float | None) -> float:
    return REGIME_FILL[regime] if fill is None else fill


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


# One engine's cold prefill throughput on the reference H200 (16,384 tokens in 0.475 s): the
# unit in which ``load`` sets request rates.
PREFILL_TOKENS_PER_S = 34_000.0
DEFAULT_LOAD = 0.75
TEMPLATE_TOKENS = 6  # chat-template tokens around each message (header + end of turn)


def _poisson_starts(rng: random.Random, n: int, rate: float) -> list[float]:
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def request_rate(load: float, prefill_tokens_per_s: float, mean_prompt_tokens: float) -> float:
    """Requests per second that offer ``load`` x the cluster's cold prefill throughput."""
    return load * prefill_tokens_per_s / max(mean_prompt_tokens, 1.0)


def multi_round_qa(
    capacity_tokens: int,
    regime: Regime,
    *,
    rounds: int = 5,
    system_tokens: int = 1000,
    user_tokens: int = 2000,
    question_tokens: int = 100,
    answer_tokens: int = 100,
    think_time: float = 0.5,
    prefill_tokens_per_s: float = 4 * PREFILL_TOKENS_PER_S,
    load: float = DEFAULT_LOAD,
    rate_scale: float = 1.0,
    fill: float | None = None,  # working set / KV capacity; default: the regime's
    seed: int = 0,
) -> Workload:
    """Users each hold a conversation over a shared system prompt and their own long context."""
    rng = random.Random(seed)
    turn = question_tokens + answer_tokens + 2 * TEMPLATE_TOKENS
    history = user_tokens + rounds * turn
    users = max(2, round((_fill(regime, fill) * capacity_tokens - system_tokens) / history))
    system = words(rng, system_tokens)
    # Mean prompt over a user's rounds: round k carries k earlier turns plus its question.
    mean_prompt = system_tokens + user_tokens + question_tokens + turn * (rounds - 1) / 2
    rate = request_rate(load, prefill_tokens_per_s, mean_prompt * rate_scale)
    starts = _poisson_starts(rng, users, rate / rounds)
    sessions = [
        Session(
            session_id=f"user-{u}",
            # The user's context follows the shared system prompt: one prefix, then a private one.
            system=system + words(rng, user_tokens),
            turns=[Turn(words(rng, question_tokens), answer_tokens) for _ in range(rounds)],
            start=starts[u],
            think_time=think_time,
        )
        for u in range(users)
    ]
    working = system_tokens + users * history
    notes = {"users": users, "request_rate": rate}
    return Workload("multi_round_qa", regime, sessions, working, capacity_tokens, notes)


def shared_prefix(
    capacity_tokens: int,
    regime: Regime,
    *,
    prompts_per_group: int = 16,
    system_tokens: int = 4000,
    question_tokens: int = 128,
    answer_tokens: int = 64,
    prefill_tokens_per_s: float = 4 * PREFILL_TOKENS_PER_S,
    load: float = DEFAULT_LOAD,
    rate_scale: float = 1.0,
    fill: float | None = None,  # working set / KV capacity; default: the regime's
    seed: int = 1,
) -> Workload:
    """Groups share a long system prompt; each request is a one-turn session with its own question."""
    rng = random.Random(seed)
    groups = max(2, round(_fill(regime, fill) * capacity_tokens / system_tokens))
    systems = [words(rng, system_tokens) for _ in range(groups)]
    n = groups * prompts_per_group
    rate = request_rate(
        load, prefill_tokens_per_s, (system_tokens + question_tokens + 2 * TEMPLATE_TOKENS) * rate_scale
    )
    starts = _poisson_starts(rng, n, rate)
    order = [g for g in range(groups) for _ in range(prompts_per_group)]
    rng.shuffle(order)
    sessions = [
        Session(f"req-{i}", systems[g], [Turn(words(rng, question_tokens), answer_tokens)], starts[i])
        for i, g in enumerate(order)
    ]
    notes = {"groups": groups, "request_rate": rate}
    return Workload("shared_prefix", regime, sessions, groups * system_tokens, capacity_tokens, notes)


def long_doc_qa(
    capacity_tokens: int,
    regime: Regime,
    *,
    doc_tokens: int = 6000,
    queries_per_doc: int = 8,
    question_tokens: int = 32,
    answer_tokens: int = 32,
    prefill_tokens_per_s: float = 4 * PREFILL_TOKENS_PER_S,
    load: float = DEFAULT_LOAD,
    rate_scale: float = 1.0,
    order: Literal["random", "interleave"] = "random",
    fill: float | None = None,  # working set / KV capacity; default: the regime's
    seed: int = 2,
) -> Workload:
    """Documents queried repeatedly; ``interleave`` cycles through all documents each pass."""
    rng = random.Random(seed)
    docs = max(2, round(_fill(regime, fill) * capacity_tokens / doc_tokens))
    texts = [words(rng, doc_tokens) for _ in range(docs)]
    if order == "interleave":
        sequence = [d for _ in range(queries_per_doc) for d in range(docs)]
    else:
        sequence = [d for d in range(docs) for _ in range(queries_per_doc)]
        rng.shuffle(sequence)
    rate = request_rate(
        load, prefill_tokens_per_s, (doc_tokens + question_tokens + 2 * TEMPLATE_TOKENS) * rate_scale
    )
    starts = _poisson_starts(rng, len(sequence), rate)
    sessions = [
        Session(f"q-{i}", texts[d], [Turn(words(rng, question_tokens), answer_tokens)], starts[i])
        for i, d in enumerate(sequence)
    ]
    notes = {"docs": docs, "request_rate": rate}
    name = "long_doc_qa" if order == "random" else "long_doc_qa_interleave"
    return Workload(name, regime, sessions, docs * doc_tokens, capacity_tokens, notes)


def build(
    name: str,
    capacity_tokens: int,
    regime: Regime,
    *,
    scale: float = 1.0,
    prefill_tokens_per_s: float = 4 * PREFILL_TOKENS_PER_S,
    load: float = DEFAULT_LOAD,
    fill: float | None = None,
) -> Workload:
    """A named workload; ``scale`` < 1 shrinks prompt sizes (not the request rate) for quick runs.

    ``prefill_tokens_per_s`` is the whole cluster's cold prefill throughput; ``fill`` overrides the
    regime's working set (a fraction of ``capacity_tokens``).
    """
    s = max(scale, 0.05)
    pf, rs = prefill_tokens_per_s, 1 / s
    if name == "multi_round_qa":
        return multi_round_qa(
            capacity_tokens,
            regime,
            system_tokens=int(1000 * s),
            user_tokens=int(2000 * s),
            question_tokens=int(100 * s),
            answer_tokens=max(8, int(100 * s)),
            prefill_tokens_per_s=pf,
            load=load,
            fill=fill,
            rate_scale=rs,
        )
    if name == "shared_prefix":
        return shared_prefix(
            capacity_tokens,
            regime,
            system_tokens=int(4000 * s),
            question_tokens=max(8, int(128 * s)),
            prefill_tokens_per_s=pf,
            load=load,
            fill=fill,
            rate_scale=rs,
        )
    if name in ("long_doc_qa", "long_doc_qa_interleave"):
        return long_doc_qa(
            capacity_tokens,
            regime,
            doc_tokens=int(6000 * s),
            order="interleave" if name == "long_doc_qa_interleave" else "random",
            prefill_tokens_per_s=pf,
            load=load,
            fill=fill,
            rate_scale=rs,
        )
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def first_reads(workload: Workload) -> set[tuple[str, int]]:
    """(session id, turn) of each request that is the first, by start time, to carry its system text.

    A first read is cold under every policy (no engine can hold a prefix never sent), so it measures
    the engine's prefill, not the router: the benchmark reports TTFT over the other requests, as the
    field benchmarks measure after a warm-up stage, and over all requests alongside.
    """
    seen: set[str] = set()
    out: set[tuple[str, int]] = set()
    for session in sorted(workload.sessions, key=lambda s: s.start):
        if session.system not in seen:
            seen.add(session.system)
            out.add((session.session_id, 0))
    return out


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
