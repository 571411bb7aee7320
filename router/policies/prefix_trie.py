"""``prefix_trie``: the baseline of vLLM production-stack's ``prefixaware`` router, for comparison.

The request text is cut into 128-character chunks, each hashed (xxh64), and walked through a trie
keyed by chunk hash; each node keeps the engines that were sent a text with that prefix. Lookup
stops at the first chunk no available engine shares; the pick is random among the longest-match
engines, or random among all when nothing matches. The request is then inserted under the chosen
engine. Like the original it ignores load, tokens and chat templates. Unlike it, node growth is
capped (``max_nodes``; the original trie is unbounded, production-stack #687): past the cap,
known prefixes still gain engines but new chunks are not stored.

With a ``seed``, each request's draw comes from a generator seeded by the seed and the request's
text, over the candidates in name order (names, unlike URLs, stay put across runs): a benchmark
run repeats its placement whatever order concurrent requests reach the router in (one shared
generator would hand the draws out in arrival order, which a busy machine reshuffles).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import xxhash
from pydantic import BaseModel, ConfigDict, Field

from kvstack.router.engines import EngineRegistry, EngineState
from kvstack.router.policies.base import Decision, Policy, RequestFeatures


class PrefixTrieSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    chunk_chars: int = Field(128, gt=0)
    min_match_chars: int = Field(0, ge=0)  # shorter matches fall back to the least-loaded engine
    max_nodes: int = Field(2_000_000, gt=0)
    chars_per_token: float = Field(3.0, gt=0.0)  # to report a predicted hit in tokens (estimate)
    seed: int | None = None


class _Node:
    __slots__ = ("children", "engines")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.engines: set[str] = set()


class HashTrie:
    """A trie over chained chunk hashes of text; each node holds the engines that saw it."""

    def __init__(self, chunk_chars: int = 128, max_nodes: int = 2_000_000) -> None:
        self.chunk = chunk_chars
        self.max_nodes = max_nodes
        self.root = _Node()
        self.nodes = 1

    def _hashes(self, text: str) -> list[tuple[int, int]]:
        c = self.chunk
        chunks = [text[i : i + c] for i in range(0, len(text), c)]
        return [(xxhash.xxh64_intdigest(chunk.encode()), len(chunk)) for chunk in chunks]

    def longest_match(self, text: str, available: set[str]) -> tuple[int, set[str]]:
        """Matched characters and the available engines that hold that whole prefix."""
        node, matched, holders = self.root, 0, set(available)
        for h, n in self._hashes(text):
            child = node.children.get(h)
            if child is None:
                break
            both = holders & child.engines
            if not both:
                break
            node, matched, holders = child, matched + n, both
        return matched, holders if matched else set()

    def insert(self, text: str, engine: str) -> None:
        node = self.root
        for h, _ in self._hashes(text):
            child = node.children.get(h)
            if child is None:
                if self.nodes >= self.max_nodes:
                    return
                child = node.children[h] = _Node()
                self.nodes += 1
            child.engines.add(engine)
            node = child


class PrefixTriePolicy(Policy):
    """The ``prefix_trie`` routing policy (text-based, load-blind)."""

    name = "prefix_trie"
    needs_text = True

    def __init__(
        self, settings: PrefixTrieSettings | None = None, *, rng: random.Random | None = None
    ) -> None:
        self.settings = s = settings or PrefixTrieSettings()
        self.rng = rng or random.Random(s.seed)
        self.trie = HashTrie(s.chunk_chars, s.max_nodes)

    def _rng_for(self, text: str) -> random.Random:
        seed = self.settings.seed
        if seed is None:
            return self.rng
        return random.Random(xxhash.xxh64_intdigest(text.encode(), seed=seed))

    def choose(self, request: RequestFeatures, candidates: Sequence[EngineState], now: float) -> Decision:
        text = request.prompt_text or ""
        ordered = sorted(candidates, key=lambda c: (c.name, c.url))
        rng = self._rng_for(text)
        matched, holders = self.trie.longest_match(text, {c.url for c in candidates})
        if not holders:
            engine, reason = rng.choice(ordered), "no_match"
        elif matched < self.settings.min_match_chars:
            low = min(c.load for c in ordered)
            engine, reason = rng.choice([c for c in ordered if c.load == low]), "below_min_match"
        else:
            engine, reason = rng.choice([c for c in ordered if c.url in holders]), "prefix"
        # inserted when chosen, as the original does; never removed (it has no eviction either)
        self.trie.insert(text, engine.url)
        hit = int(matched / self.settings.chars_per_token) if engine.url in holders else 0
        return Decision(engine=engine, reason=reason, predicted_hit_tokens=hit)


def make_policy(
    *, registry: EngineRegistry | None = None, settings: Any = None, rng: random.Random | None = None
) -> PrefixTriePolicy:
    """Factory for the router's policy registry; ``settings.prefix_trie`` configures it when present."""
    config = getattr(settings, "prefix_trie", None)
    if not isinstance(config, PrefixTrieSettings):
        config = PrefixTrieSettings()
    return PrefixTriePolicy(config, rng=rng if config.seed is None else None)
