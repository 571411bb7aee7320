"""The cache-aware policy's settings: the cost model's constants (defaults: an 8B model on one
H200, tests/reference), its guards, and what it learns; ``cache_aware.decision`` in the router's
configuration."""

from __future__ import annotations

import itertools

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvstack.router.tier_cost import TierLearning


class CacheAwareSettings(BaseModel):
    """Cost-model constants (defaults: an 8B model on one H200, tests/reference) and guards."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # cold prefill: 16,384 tokens in 0.475 s, 1,024 in 0.028 s -> ~34K tokens/s
    prefill_tokens_per_s: float = Field(34_000.0, gt=0.0)
    base_ttft_s: float = Field(0.011, ge=0.0)  # a full prefix hit still takes ~11 ms
    # decode ITL grows 4.9 ms -> 7.6 ms from batch 1 to 128: ~21 us per running request per step
    decode_step_s_per_running: float = Field(2.1e-5, ge=0.0)
    prefill_chunk_tokens: int = Field(8192, gt=0)  # max_num_batched_tokens: prefill shares steps
    tokens_per_waiting: float = Field(1024.0, ge=0.0)  # a waiting request we did not send
    # Weight of this request's own uncached prefill beyond its TTFT: compute the cluster spends and
    # later requests wait for. Without it a sibling of a request still prefilling sees a tie
    # between waiting for the holder and recomputing elsewhere, and scatters.
    uncached_weight: float = Field(0.5, ge=0.0)
    load_factor: float = Field(1.25, ge=1.0)
    # ... and at least this many requests above the mean before an engine counts as over the load
    # bound. At 1 a light load tripped it: an H200 run (2026-12-05, four engines) sent a new user
    # away from the engine holding its system prompt because that engine had 2 requests decoding
    # and the others none, and the cold engine took 1.05 s to its first token against 0.25 s.
    load_slack: float = Field(3.0, ge=0.0)
    # A holder above the load bound whose hit is under this fraction of the prompt is skipped even
    # when the hit would outweigh its queue: the request recomputes most of its prompt anyway, so
    # a shared prefix (a product's system prompt) spreads to other engines instead of pulling every
    # new session onto its first holder, where sticky follow-ups then keep the imbalance.
    replicate_below: float = Field(0.5, ge=0.0, le=1.0)
    cold_slack_s: float = Field(0.05, ge=0.0)
    # Engines whose cost is within this of the best are equally good for this request: the least
    # loaded of them wins. Without it a prefix every engine holds (a product's system prompt)
    # leaves new sessions to the tie-break hash, and sticky follow-ups keep the imbalance.
    balance_slack_s: float = Field(0.01, ge=0.0)
    # An exact, event-fed index learns nothing from a random pick, and each one costs a cold
    # prefill; hot-prefix replication warms other engines when load asks for it.
    explore_rate: float = Field(0.0, ge=0.0, le=1.0)
    session_bonus_s: float = Field(0.02, ge=0.0)
    prefill_deadline_factor: float = Field(2.0, ge=1.0)  # release queued tokens this late at most
    prefill_deadline_floor_s: float = Field(1.0, gt=0.0)
    max_sessions: int = Field(100_000, gt=0)
    # session keys come from clients (a header, the OpenAI ``user`` field): up to this many bytes of
    # them are remembered (sys.getsizeof of each key plus SESSION_ENTRY_BYTES), the oldest go first
    max_session_bytes: int = Field(16 * 2**20, ge=64 * 1024)
    seed: int | None = None  # exploration RNG; replicas with the same seed decide identically
    # Discount a GPU hit by the prefill queued ahead of it against the engine's free KV: the engine
    # evicts the prefix before the request runs when the queue needs more blocks than are free.
    # Off by default: on the simulator at KV pressure (load 0.9 for 60 s) the uniform eviction model
    # lost GPU hits (75.5% -> 69%) and TTFT p90 (10.5 -> 14.1 s); placing the prefix by what was
    # freed after it gained p90 (8.7 s) but still lost hits (72.7%) (bench-results/lmcache/README.md)
    residency: bool = False
    # Engines sharing a device (Endpoint.device): an engine's speed relative to alone on it with 2,
    # 3, ... engines busy there; past the table the last entry's device time is shared equally, and
    # an empty table shares the device's time equally (1/2, 1/3, ...). The default is the one
    # measurement: vLLM 0.24 engines time-slicing one H200, eager, ran at 0.65 of alone with two
    # busy (bench-results/flow). Equal sharing would price waking a second engine as never
    # worth it, so a shared device would take one engine's throughput however long its queue.
    shared_device_speed: tuple[float, ...] = (0.65,)
    # Price shared devices with the slowdown flow control learns from the engines
    # (router/flow/device_speed.py), and a device's engines at its rate alone, instead of
    # ``shared_device_speed`` (the prior until 8 samples each). On: the prior is one GPU's
    # (an H200's 0.65); two LMCache engines on an H100 kept ~0.95 (bench-results/lmcache
    # sections 17-18), and the load bound weighs neighbours by this speed too
    learn_device_speed: bool = True
    tier_learning: TierLearning = TierLearning()

    @field_validator("shared_device_speed")
    @classmethod
    def _speeds(cls, speeds: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.0 < x <= 1.0 for x in speeds):
            raise ValueError("each speed is a fraction of the engine's speed alone, in (0, 1]")
        if any(b > a for a, b in itertools.pairwise(speeds)):
            raise ValueError("an engine cannot run faster with more engines busy on its device")
        return speeds
